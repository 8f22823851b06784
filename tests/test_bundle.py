"""Model bundles: create/open roundtrips, manifest validation, labels TSV, zip safety, the `bundle` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from speciesclf.bundles import bundle as bundle_mod
from speciesclf.bundles.bundle import (
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    Label,
    Manifest,
    UnknownRule,
    create_bundle,
    read_labels,
    write_labels,
)
from speciesclf.preprocessing.spec import PreprocessSpec

LABELS = [
    Label(0, "red fox", "Vulpes vulpes"),
    Label(1, "European badger", "Meles meles"),
    Label(2, "Eurasian lynx", "Lynx lynx"),
    Label(3, "domestic cat"),
]


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECIESCLF_HOME", str(tmp_path / "home"))


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(os.urandom(4096))
    return path


def _create(out: Path, model: Path, **kwargs) -> Path:
    args = {"labels": LABELS, "name": "fox-net", "version": "1.0.0", "num_outputs": 4}
    args.update(kwargs)
    return create_bundle(out, model_file=model, **args)


def _manifest_dict(**changes) -> dict:
    data = {
        "schema_version": SCHEMA_VERSION,
        "name": "fox-net",
        "version": "1.0.0",
        "framework": "onnx",
        "model_file": "model.onnx",
        "model_sha256": "a" * 64,
        "labels_file": "labels.tsv",
        "preprocess": PreprocessSpec().to_dict(),
        "label_subset": [0, 1],
        "num_outputs": 10,
    }
    data.update(changes)
    return data


# ------------------------------------------------------------------------------------ roundtrips


def test_create_open_roundtrip_directory(tmp_path: Path, model: Path) -> None:
    spec = PreprocessSpec(size=160, resize=182, interpolation="bicubic")
    out = _create(
        tmp_path / "b",
        model,
        preprocess=spec,
        unknown=UnknownRule("max_probability", 0.4),
        temperature=1.5,
        metrics={"top1": 0.91, "top5": 1},
        lineage={"parent_version": "0.9.0", "training_data": "inat-2021"},
        notes="Füchse & Dachse",
    )
    assert out == tmp_path / "b"
    assert sorted(p.name for p in out.iterdir()) == ["labels.tsv", "manifest.json", "model.onnx"]
    b = Bundle.open(out)
    m = b.manifest
    assert (m.name, m.version, m.framework, b.ref) == ("fox-net", "1.0.0", "onnx", "fox-net@1.0.0")
    assert m.model_sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert m.preprocess == spec
    assert m.unknown == UnknownRule("max_probability", 0.4)
    assert m.metrics == {"top1": 0.91, "top5": 1.0}
    assert m.lineage["parent_version"] == "0.9.0"
    assert m.notes == "Füchse & Dachse"
    assert m.created_at.endswith("Z") and m.schema_version == SCHEMA_VERSION
    assert b.labels == LABELS
    assert b.model_path == out / "model.onnx" and b.model_path.read_bytes() == model.read_bytes()
    assert b.path == out
    # manifest.json: sorted keys, indented, UTF-8 (not \u-escaped)
    text = (out / "manifest.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert "Füchse" in text
    assert Manifest.from_dict(data) == m
    hash(m)  # a frozen manifest stays hashable despite its dicts


def test_create_open_roundtrip_zip(tmp_path: Path, model: Path) -> None:
    out = _create(tmp_path / "fox.zip", model, label_subset=[0, 2], unknown=UnknownRule("subset_mass", 0.5))
    assert out.is_file() and zipfile.is_zipfile(out)
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == ["labels.tsv", "manifest.json", "model.onnx"]
    b = Bundle.open(out)
    assert b.path.is_dir() and b.path != out and b.source == out
    assert b.model_path.read_bytes() == model.read_bytes()
    assert b.labels == LABELS and b.manifest.label_subset == (0, 2)
    extracted = b.path
    b.close()
    assert not extracted.exists()
    with Bundle.open(out) as again:
        assert again.manifest.unknown == UnknownRule("subset_mass", 0.5)


def test_zip_with_a_single_top_folder_opens(tmp_path: Path, model: Path) -> None:
    src = _create(tmp_path / "b", model)
    archive = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"fox-net-1.0.0/{f.name}")
    with Bundle.open(archive) as b:
        assert b.ref == "fox-net@1.0.0" and b.labels == LABELS


def test_labels_from_tsv_path_and_framework_inference(tmp_path: Path) -> None:
    tsv = tmp_path / "labels.tsv"
    write_labels(tsv, LABELS)
    for suffix, framework in ((".onnx", "onnx"), (".pt", "torchscript"), (".pt2", "torch-export")):
        model = tmp_path / f"m{suffix}"
        model.write_bytes(b"x" * 10)
        out = create_bundle(tmp_path / f"b{suffix}", model_file=model, labels=tsv, name="n", version="0.1.0")
        b = Bundle.open(out)
        assert b.manifest.framework == framework and b.manifest.model_file == f"model{suffix}"
        assert b.labels == LABELS
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"x")
    with pytest.raises(BundleError, match="manifest.framework"):
        create_bundle(tmp_path / "odd", model_file=odd, labels=LABELS, name="n", version="0.1.0")
    assert not (tmp_path / "odd").exists()
    b = Bundle.open(
        create_bundle(tmp_path / "odd", model_file=odd, labels=LABELS, name="n", version="0.1.0", framework="onnx")
    )
    assert b.manifest.framework == "onnx"


def test_copy_model_false_hard_links(tmp_path: Path, model: Path) -> None:
    out = _create(tmp_path / "b", model, copy_model=False)
    assert (out / "model.onnx").stat().st_ino == model.stat().st_ino
    Bundle.open(out)


def test_create_refuses_existing_out_and_leaves_nothing_on_failure(tmp_path: Path, model: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        _create(tmp_path / "taken", model)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(BundleError, match="manifest.version"):
        _create(tmp_path / "bad", model, version="1.0")
    with pytest.raises(BundleError, match="labels"):
        _create(tmp_path / "bad.zip", model, labels=LABELS[:3])
    assert sorted(os.listdir(tmp_path)) == before  # no bundle, no temporary sibling


def test_manifest_dict_roundtrip_and_defaults() -> None:
    m = Manifest.from_dict(_manifest_dict())
    assert m.output_kind == "logits" and m.temperature == 1.0 and m.unknown is None
    assert m.metrics == {} and m.lineage == {} and m.notes == "" and m.created_at == ""
    assert m.label_subset == (0, 1)
    d = m.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Manifest.from_dict(d) == m
    written_when_set = {"embedding_output"}  # optional fields left out of manifests that do not use them
    assert set(d) == {f for f in Manifest.__dataclass_fields__} - written_when_set


# ------------------------------------------------------------------------------------ validation

BAD_FIELDS = [
    ("name", "Fox", "manifest.name"),
    ("name", "-fox", "manifest.name"),
    ("name", "x" * 65, "manifest.name"),
    ("name", 3, "manifest.name"),
    ("version", "1.0", "manifest.version"),
    ("version", "01.0.0", "manifest.version"),
    ("version", "1.0.0-", "manifest.version"),
    ("version", "v1.0.0", "manifest.version"),
    ("framework", "Tensor Flow", "manifest.framework"),
    ("framework", 3, "manifest.framework"),
    ("model_file", "../model.onnx", "manifest.model_file"),
    ("model_file", "/etc/passwd", "manifest.model_file"),
    ("model_file", "a/../../b", "manifest.model_file"),
    ("model_file", "C:\\model.onnx", "manifest.model_file"),
    ("model_file", "", "manifest.model_file"),
    ("model_sha256", "A" * 64, "manifest.model_sha256"),
    ("model_sha256", "a" * 63, "manifest.model_sha256"),
    ("labels_file", "/labels.tsv", "manifest.labels_file"),
    ("labels_file", "model.onnx", "manifest.labels_file"),
    ("preprocess", {"size": -1}, "manifest.preprocess"),
    ("preprocess", {"colour": "yes"}, "manifest.preprocess"),
    ("preprocess", "imagenet", "manifest.preprocess"),
    ("output_kind", "softmax", "manifest.output_kind"),
    ("num_outputs", 0, "manifest.num_outputs"),
    ("num_outputs", True, "manifest.num_outputs"),
    ("num_outputs", 10.0, "manifest.num_outputs"),
    ("label_subset", [], "manifest.label_subset"),
    ("label_subset", [0, -1], "manifest.label_subset"),
    ("label_subset", [1, 1], "manifest.label_subset"),
    ("label_subset", [0, 10], "manifest.label_subset"),
    ("label_subset", "0,1", "manifest.label_subset"),
    ("unknown", {"method": "entropy", "threshold": 0.5}, "manifest.unknown.method"),
    ("unknown", {"method": "max_probability", "threshold": 1.0}, "manifest.unknown.threshold"),
    ("unknown", {"method": "max_probability", "threshold": 0}, "manifest.unknown.threshold"),
    ("unknown", {"method": "max_probability"}, "manifest.unknown.threshold"),
    ("unknown", {"method": "max_probability", "threshold": 0.5, "x": 1}, "manifest.unknown"),
    ("unknown", "max_probability", "manifest.unknown"),
    ("temperature", 0, "manifest.temperature"),
    ("temperature", float("nan"), "manifest.temperature"),
    ("temperature", "1.0", "manifest.temperature"),
    ("metrics", {"top1": "high"}, "manifest.metrics.top1"),
    ("metrics", [0.9], "manifest.metrics"),
    ("lineage", {"author": "me"}, "manifest.lineage"),
    ("lineage", {"parent_version": 3}, "manifest.lineage.parent_version"),
    ("notes", 5, "manifest.notes"),
    ("created_at", "yesterday", "manifest.created_at"),
    ("created_at", "2024-05-01T12:00:00+02:00", "manifest.created_at"),
    ("schema_version", 2, "manifest.schema_version"),
    ("schema_version", "1", "manifest.schema_version"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_FIELDS])
def test_every_validation_error_names_its_field(field: str, value: object, expected: str) -> None:
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(_manifest_dict(**{field: value}))
    assert str(info.value).startswith(expected), str(info.value)


def test_unknown_missing_and_cross_field_errors() -> None:
    with pytest.raises(BundleError, match=r"unknown field\(s\) \['extra'\]"):
        Manifest.from_dict(_manifest_dict(extra=1))
    data = _manifest_dict()
    del data["model_sha256"]
    with pytest.raises(BundleError, match=r"^manifest\.model_sha256: missing"):
        Manifest.from_dict(data)
    with pytest.raises(BundleError, match=r"^manifest\.unknown\.method: 'subset_mass' requires manifest\.label_subset"):
        Manifest.from_dict(_manifest_dict(label_subset=None, unknown={"method": "subset_mass", "threshold": 0.5}))
    # a newer schema is reported as such, before its (to us) unknown fields
    with pytest.raises(BundleError, match=r"^manifest\.schema_version: expected 1 \(written by a newer"):
        Manifest.from_dict(_manifest_dict(schema_version=2, new_field=1))
    with pytest.raises(BundleError, match="expected a JSON object"):
        Manifest.from_dict([])  # type: ignore[arg-type]
    assert Manifest.from_dict(_manifest_dict(created_at="2024-05-01T12:00:00Z")).created_at == "2024-05-01T12:00:00Z"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"labels": [*LABELS, Label(2, "dupe")], "num_outputs": None}, "labels: duplicate index 2"),
        ({"labels": [*LABELS, Label(4, "wolf")]}, "manifest.num_outputs"),
        ({"labels": LABELS[:3]}, "must cover 0..3"),
        ({"num_outputs": 10, "label_subset": [0, 7]}, "manifest.label_subset: output indices without a label row: 7"),
        ({"label_subset": [0, 5]}, "manifest.label_subset"),
        ({"unknown": UnknownRule("subset_mass", 0.5)}, "manifest.unknown.method"),
        ({"labels": []}, "labels"),
        ({"name": "Fox"}, "manifest.name"),
        ({"temperature": -1.0}, "manifest.temperature"),
    ],
)
def test_create_bundle_validates_labels_against_manifest(
    tmp_path: Path, model: Path, kwargs: dict, expected: str
) -> None:
    with pytest.raises(BundleError, match=expected.replace(".", r"\.")):
        _create(tmp_path / "b", model, **kwargs)
    assert not (tmp_path / "b").exists()


def test_label_subset_allows_extra_rows_and_no_num_outputs(tmp_path: Path, model: Path) -> None:
    b = Bundle.open(_create(tmp_path / "b", model, num_outputs=None, label_subset=[3, 1]))
    assert b.manifest.label_subset == (3, 1) and len(b.labels) == 4


def test_label_rules() -> None:
    assert Label(0, "fox", "").scientific_name is None
    for bad in (lambda: Label(-1, "x"), lambda: Label(True, "x"), lambda: Label(0, ""), lambda: Label(0, "a\tb")):
        with pytest.raises(BundleError, match="labels"):
            bad()
    with pytest.raises(BundleError, match="scientific_name"):
        Label(0, "fox", "Vulpes\nvulpes")


# ------------------------------------------------------------------------------------ integrity


def test_sha256_mismatch(tmp_path: Path, model: Path) -> None:
    out = _create(tmp_path / "b", model)
    expected = Bundle.open(out).manifest.model_sha256
    (out / "model.onnx").write_bytes(b"tampered")
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(BundleError, match=f"model_sha256 mismatch: manifest says {expected}, file has {actual}"):
        Bundle.open(out)
    b = Bundle.open(out, verify=False)  # structure is fine; only the hash is off
    with pytest.raises(BundleError, match="model_sha256 mismatch"):
        b.verify()


def test_missing_files_and_bad_json(tmp_path: Path, model: Path) -> None:
    out = _create(tmp_path / "b", model)
    (out / "labels.tsv").unlink()
    with pytest.raises(BundleError, match="manifest.labels_file"):
        Bundle.open(out)
    out2 = _create(tmp_path / "c", model)
    (out2 / "model.onnx").unlink()
    with pytest.raises(BundleError, match="manifest.model_file"):
        Bundle.open(out2, verify=False)
    (out2 / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json"):
        Bundle.open(out2)
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.open(tmp_path / "nothing")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(BundleError, match="neither a bundle directory nor a zip"):
        Bundle.open(tmp_path / "plain.txt")


def test_directory_bundle_symlink_escaping_is_rejected(tmp_path: Path, model: Path) -> None:
    out = _create(tmp_path / "b", model)
    (out / "model.onnx").unlink()
    (out / "model.onnx").symlink_to(model)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.open(out)


def _zip_with(tmp_path: Path, model: Path, name: str, extra) -> Path:
    src = _create(tmp_path / f"src-{name}", model)
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f.name)
        extra(zf)
    return archive


@pytest.mark.parametrize(
    ("entry", "expected"),
    [("../evil.txt", r"'\.\.' in path"), ("sub/../../evil.txt", r"'\.\.' in path"), ("/tmp/evil.txt", "absolute")],
)
def test_zip_slip_and_absolute_paths_are_rejected(tmp_path: Path, model: Path, entry: str, expected: str) -> None:
    archive = _zip_with(tmp_path, model, "slip", lambda zf: zf.writestr(entry, b"pwned"))
    with pytest.raises(BundleError, match=expected):
        Bundle.open(archive)
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_entry_is_rejected(tmp_path: Path, model: Path) -> None:
    def add_link(zf: zipfile.ZipFile) -> None:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")

    archive = _zip_with(tmp_path, model, "symlink", add_link)
    with pytest.raises(BundleError, match="symlink"):
        Bundle.open(archive)


def test_zip_bomb_is_rejected(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _zip_with(
        tmp_path,
        model,
        "bomb",
        lambda zf: zf.writestr("padding.bin", b"\0" * 3_000_000, compress_type=zipfile.ZIP_DEFLATED),
    )
    assert archive.stat().st_size < 100_000
    monkeypatch.setattr(bundle_mod, "MAX_ZIP_UNCOMPRESSED", 2_000_000)
    with pytest.raises(BundleError, match="zip bomb"):
        Bundle.open(archive)
    monkeypatch.setattr(bundle_mod, "MAX_ZIP_UNCOMPRESSED", 10_000_000)
    with Bundle.open(archive) as b:
        assert b.ref == "fox-net@1.0.0"


def test_zip_bomb_limit_is_2_gib() -> None:
    assert bundle_mod.MAX_ZIP_UNCOMPRESSED == 2 * 2**30


def test_corrupt_zip_is_a_bundle_error(tmp_path: Path, model: Path) -> None:
    out = _create(tmp_path / "b.zip", model)
    data = bytearray(out.read_bytes())
    data[40:60] = b"\xff" * 20  # inside the first entry's data or header
    out.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        Bundle.open(out)


# ------------------------------------------------------------------------------------ labels TSV


def test_labels_tsv_roundtrip_unicode(tmp_path: Path) -> None:
    labels = [
        Label(0, "Rotfuchs", "Vulpes vulpes"),
        Label(7, "狐狸"),
        Label(3, "ñandú común", "Rhea americana"),
        Label(1, "lynx 🐈", "Lynx lynx"),
    ]
    path = tmp_path / "labels.tsv"
    write_labels(path, labels)
    raw = path.read_bytes().decode("utf-8")
    assert raw.splitlines()[0] == "index\tname\tscientific_name"
    assert read_labels(path) == labels  # file order kept
    path.write_bytes(b"\xef\xbb\xbf" + raw.replace("\n", "\r\n").encode() + b"\n\n")  # BOM, CRLF, blank lines
    assert read_labels(path) == labels
    path.write_text("index\tname\n0\tfox\n1\tbadger\n", encoding="utf-8")
    assert read_labels(path) == [Label(0, "fox"), Label(1, "badger")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("idx\tname\n0\tfox\n", "line 1"),
        ("index\tname\tscientific_name\n", "no label rows"),
        ("index\tname\tscientific_name\nzero\tfox\t\n", "line 2: index"),
        ("index\tname\tscientific_name\n0\tfox\t\n-1\tbadger\t\n", "line 3: index"),
        ("index\tname\tscientific_name\n0\n", "line 2: expected 2 or 3"),
        ("index\tname\tscientific_name\n0\t\t\n", "line 2"),
    ],
)
def test_bad_labels_tsv(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "labels.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BundleError, match=expected):
        read_labels(path)


def test_labels_tsv_must_be_utf8(tmp_path: Path) -> None:
    path = tmp_path / "labels.tsv"
    path.write_bytes("index\tname\n0\tr\xe9nard\n".encode("latin-1"))
    with pytest.raises(BundleError, match="UTF-8"):
        read_labels(path)


# ------------------------------------------------------------------------------------ CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speciesclf", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_cli_bundle_create_inspect_verify(tmp_path: Path, model: Path) -> None:
    write_labels(tmp_path / "labels.tsv", LABELS)
    r = _cli(
        "bundle", "create", "out", "--model", str(model), "--labels", "labels.tsv", "--name", "fox-net",
        "--version", "2.1.0", "--size", "160", "--resize", "182", "--mean", "0.5", "0.5", "0.5",
        "--num-outputs", "4", "--unknown-method", "max_probability", "--unknown-threshold", "0.3",
        "--metric", "top1=0.8", "--notes", "cli made", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    b = Bundle.open(tmp_path / "out")
    assert b.manifest.preprocess == PreprocessSpec(size=160, resize=182, mean=(0.5, 0.5, 0.5))
    assert b.manifest.unknown == UnknownRule("max_probability", 0.3) and b.manifest.metrics == {"top1": 0.8}

    r = _cli("bundle", "inspect", "out", cwd=tmp_path)
    assert r.returncode == 0 and "fox-net@2.1.0" in r.stdout and "max_probability" in r.stdout
    r = _cli("bundle", "inspect", "out", "--json", cwd=tmp_path)
    assert r.returncode == 0 and Manifest.from_dict(json.loads(r.stdout)) == b.manifest
    r = _cli("bundle", "verify", "out", "--hash-only", cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout
    r = _cli("bundle", "verify", "out", cwd=tmp_path)  # the model is random bytes: its runtime says so
    assert r.returncode == 1 and "onnxruntime cannot load the model" in r.stderr, r.stderr

    r = _cli("bundle", "create", "z.zip", "--model", str(model), "--labels", "labels.tsv", "--name", "fox-net",
             "--version", "2.2.0", "--resize", "0", "--size", "200", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _cli("bundle", "verify", "z.zip", "--hash-only", cwd=tmp_path).returncode == 0
    assert Bundle.open(tmp_path / "z.zip").manifest.preprocess.resize is None

    (tmp_path / "out" / "model.onnx").write_bytes(b"corrupt")
    r = _cli("bundle", "verify", "out", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("speciesclf: error: model_sha256 mismatch") and "Traceback" not in r.stderr


def test_cli_bundle_errors_are_one_line(tmp_path: Path, model: Path) -> None:
    write_labels(tmp_path / "labels.tsv", LABELS)
    r = _cli("bundle", "create", "out", "--model", str(model), "--labels", "labels.tsv", "--name", "fox-net",
             "--version", "1.0", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("speciesclf: error: manifest.version")
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    r = _cli("bundle", "inspect", "missing", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("speciesclf: error:") and "Traceback" not in r.stderr
    r = _cli("bundle", "create", "out", "--model", str(model), "--labels", "labels.tsv", "--name", "fox-net",
             "--version", "1.0.0", "--unknown-method", "subset_mass", "--unknown-threshold", "0.5", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and "manifest.unknown.method" in r.stderr and "Traceback" not in r.stderr
