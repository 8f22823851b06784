"""The label tables shipped in ``speciesclf.model`` (``labels/``): ``imagenet1k.tsv`` and the ``species100.tsv`` subset.

species100 is 100 distinct animal species, each an ImageNet-1k class among the animals (indices 0-397),
spread over the main groups of animals. The group of every row is pinned here, so that a change to the
table is a deliberate change to this test too.
"""

from __future__ import annotations

import csv
import importlib.resources
import re
from collections import Counter

import pytest

HEADER = ["index", "name", "scientific_name"]
BINOMIAL = re.compile(r"^[A-Z][a-z]+ [a-z]+$")

# ImageNet classes whose name shares no word with the common name used in species100.
ALIASES = {
    40: "green anole",  # "American chameleon"
    84: "Indian peafowl",  # "peacock"
    140: "dunlin",  # "red-backed sandpiper"
    383: "ring-tailed lemur",  # "Madagascar cat"
}

MAMMAL, BIRD, REPTILE, AMPHIBIAN, FISH, INSECT, ARACHNID, OTHER = (
    "mammal", "bird", "reptile", "amphibian", "fish", "insect", "arachnid", "other invertebrate",
)

GROUPS = {
    # fish
    0: FISH, 1: FISH, 2: FISH, 3: FISH, 391: FISH, 392: FISH,
    # birds
    9: BIRD, 10: BIRD, 11: BIRD, 12: BIRD, 14: BIRD, 15: BIRD, 22: BIRD, 24: BIRD, 80: BIRD, 82: BIRD,
    84: BIRD, 87: BIRD, 89: BIRD, 98: BIRD, 100: BIRD, 127: BIRD, 128: BIRD, 131: BIRD, 132: BIRD,
    135: BIRD, 137: BIRD, 139: BIRD, 140: BIRD, 141: BIRD, 145: BIRD,
    # amphibians
    25: AMPHIBIAN, 26: AMPHIBIAN, 28: AMPHIBIAN, 29: AMPHIBIAN, 30: AMPHIBIAN,
    # reptiles
    33: REPTILE, 34: REPTILE, 39: REPTILE, 40: REPTILE, 43: REPTILE, 45: REPTILE, 48: REPTILE,
    49: REPTILE, 50: REPTILE, 53: REPTILE, 61: REPTILE, 62: REPTILE, 63: REPTILE, 67: REPTILE,
    68: REPTILE,
    # arachnids
    72: ARACHNID, 73: ARACHNID, 74: ARACHNID, 75: ARACHNID,
    # insects
    301: INSECT, 309: INSECT, 315: INSECT, 321: INSECT, 323: INSECT, 324: INSECT,
    # other invertebrates (a cephalopod and crustaceans)
    117: OTHER, 118: OTHER, 119: OTHER, 121: OTHER, 122: OTHER,
    # mammals
    103: MAMMAL, 105: MAMMAL, 147: MAMMAL, 148: MAMMAL, 149: MAMMAL, 269: MAMMAL, 272: MAMMAL,
    274: MAMMAL, 275: MAMMAL, 277: MAMMAL, 279: MAMMAL, 280: MAMMAL, 286: MAMMAL, 288: MAMMAL,
    289: MAMMAL, 290: MAMMAL, 291: MAMMAL, 292: MAMMAL, 293: MAMMAL, 294: MAMMAL, 295: MAMMAL,
    296: MAMMAL, 299: MAMMAL, 344: MAMMAL, 346: MAMMAL, 349: MAMMAL, 352: MAMMAL, 354: MAMMAL,
    367: MAMMAL, 383: MAMMAL, 385: MAMMAL, 386: MAMMAL, 387: MAMMAL, 388: MAMMAL,
}


def _read(name: str) -> tuple[list[str], list[dict[str, str]]]:
    text = importlib.resources.files("speciesclf.model").joinpath("labels", name).read_text(encoding="utf-8")
    reader = csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = list(reader)
    return list(reader.fieldnames or []), rows


@pytest.fixture(scope="module")
def imagenet() -> dict[int, str]:
    header, rows = _read("imagenet1k.tsv")
    assert header == HEADER
    return {int(row["index"]): row["name"] for row in rows}


@pytest.fixture(scope="module")
def species() -> list[dict[str, str]]:
    header, rows = _read("species100.tsv")
    assert header == HEADER
    return rows


def _words(name: str) -> set[str]:
    return set(re.findall(r"[a-z]+", name.lower()))


def test_imagenet1k_table(imagenet):
    assert sorted(imagenet) == list(range(1000))
    assert all(name and name == name.strip() for name in imagenet.values())
    _, rows = _read("imagenet1k.tsv")
    assert all(row["scientific_name"] == "" for row in rows)
    assert (imagenet[0], imagenet[397], imagenet[999]) == ("tench", "puffer", "toilet tissue")


def test_species100_shape(species):
    assert len(species) == 100
    for row in species:
        assert None not in row, f"extra columns in {row}"
        assert all(value and value == value.strip() for value in row.values()), row
    indices = [int(row["index"]) for row in species]
    assert len(set(indices)) == 100
    assert all(0 <= i <= 397 for i in indices)
    assert indices == sorted(indices)


def test_species100_scientific_names(species):
    names = [row["scientific_name"] for row in species]
    bad = [n for n in names if not BINOMIAL.match(n)]
    assert not bad, f"not a binomial: {bad}"
    duplicated = [n for n, c in Counter(names).items() if c > 1]
    assert not duplicated, f"the same species twice: {duplicated}"
    assert sum(n == "Canis familiaris" for n in names) <= 4
    common = [row["name"].lower() for row in species]
    assert len(set(common)) == 100


def test_species100_names_match_imagenet(species, imagenet):
    mismatched = []
    for row in species:
        index, name = int(row["index"]), row["name"]
        if index in ALIASES:
            ok = ALIASES[index] == name
        else:
            ok = bool(_words(name) & _words(imagenet[index]))
        if not ok:
            mismatched.append((index, imagenet[index], name))
    assert not mismatched, f"species100 names that do not match their ImageNet class: {mismatched}"
    assert set(ALIASES) <= {int(row["index"]) for row in species}


def test_species100_groups(species):
    indices = {int(row["index"]) for row in species}
    assert indices == set(GROUPS), (sorted(indices - set(GROUPS)), sorted(set(GROUPS) - indices))
    counts = Counter(GROUPS.values())
    assert counts[MAMMAL] >= 20
    assert counts[BIRD] >= 15
    assert counts[REPTILE] + counts[AMPHIBIAN] >= 8
    assert counts[FISH] >= 6
    assert counts[INSECT] + counts[ARACHNID] >= 10
    assert counts[OTHER] >= 4
    assert sum(counts.values()) == 100
