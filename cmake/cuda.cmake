# Included by CMakeLists.txt when a CUDA compiler was found: builds speciesclf._native_cuda.

# Turing and newer (CUDA 13's floor), with PTX for GPUs newer than the list.
set(SPECIESCLF_CUDA_ARCHITECTURES "75-real;80-real;86-real;89-real;90-real;90-virtual"
    CACHE STRING "CUDA architectures of the GPU kernels")
set(CMAKE_CUDA_ARCHITECTURES ${SPECIESCLF_CUDA_ARCHITECTURES})
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# nvJPEG: an explicit root first, then the toolkit, then the nvidia-nvjpeg wheel of the building Python.
set(SPECIESCLF_NVJPEG_ROOT "" CACHE PATH "A folder with include/nvjpeg.h and lib/libnvjpeg.so*")
set(_nvjpeg_roots "")
if(SPECIESCLF_NVJPEG_ROOT)
  list(APPEND _nvjpeg_roots "${SPECIESCLF_NVJPEG_ROOT}")
endif()
list(APPEND _nvjpeg_roots "${CUDAToolkit_LIBRARY_ROOT}" "${CUDAToolkit_TARGET_DIR}")
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import importlib.util as u; s = u.find_spec('nvidia'); print(';'.join(s.submodule_search_locations) if s else '')"
  OUTPUT_VARIABLE _nvidia_dirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
foreach(_dir IN LISTS _nvidia_dirs)
  list(APPEND _nvjpeg_roots "${_dir}/cu${CUDAToolkit_VERSION_MAJOR}")
endforeach()
set(SPECIESCLF_NVJPEG_LIBRARY "")
foreach(_root IN LISTS _nvjpeg_roots)
  if(EXISTS "${_root}/include/nvjpeg.h")
    find_library(_nvjpeg_lib NAMES nvjpeg "libnvjpeg.so.${CUDAToolkit_VERSION_MAJOR}"
                 PATHS "${_root}/lib" "${_root}/lib64" "${_root}/targets/x86_64-linux/lib" NO_DEFAULT_PATH)
    if(_nvjpeg_lib)
      set(SPECIESCLF_NVJPEG_INCLUDE "${_root}/include")
      set(SPECIESCLF_NVJPEG_LIBRARY "${_nvjpeg_lib}")
      break()
    endif()
    unset(_nvjpeg_lib CACHE)
  endif()
endforeach()

# The kernels: their own library, so that pybind11's host-only flags never reach nvcc.
add_library(speciesclf_cuda_kernels STATIC csrc/cuda/fused_kernels.cu)
target_include_directories(speciesclf_cuda_kernels PRIVATE csrc)
# No fused multiply-add: the filter weights are computed in double on the device exactly as on the host.
target_compile_options(speciesclf_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--fmad=false>)
set_target_properties(speciesclf_cuda_kernels PROPERTIES CUDA_RUNTIME_LIBRARY Static)

pybind11_add_module(_native_cuda MODULE csrc/cuda/module_cuda.cpp csrc/cuda/gpu_pipeline.cpp)
target_include_directories(_native_cuda PRIVATE csrc)
target_link_libraries(_native_cuda PRIVATE speciesclf_core speciesclf_cuda_kernels CUDA::cudart_static)
target_compile_options(_native_cuda PRIVATE ${SPECIESCLF_CXX_FLAGS})
string(REPLACE ";" "," _archs "${SPECIESCLF_CUDA_ARCHITECTURES}")
target_compile_definitions(_native_cuda PRIVATE SPECIESCLF_VERSION="${SKBUILD_PROJECT_VERSION}"
  SPECIESCLF_CUDA_ARCHS="${_archs}"
  SPECIESCLF_CUDA_TOOLKIT="${CUDAToolkit_VERSION}")
if(SPECIESCLF_NVJPEG_LIBRARY)
  target_sources(_native_cuda PRIVATE csrc/cuda/nvjpeg_decoder.cpp)
  target_include_directories(_native_cuda PRIVATE "${SPECIESCLF_NVJPEG_INCLUDE}")
  target_link_libraries(_native_cuda PRIVATE "${SPECIESCLF_NVJPEG_LIBRARY}")
  target_compile_definitions(_native_cuda PRIVATE SPECIESCLF_HAVE_NVJPEG=1)
  get_filename_component(_nvjpeg_dir "${SPECIESCLF_NVJPEG_LIBRARY}" DIRECTORY)
  # Installed beside the nvidia-nvjpeg wheel, or where the toolkit keeps it.
  set_target_properties(_native_cuda PROPERTIES
    INSTALL_RPATH "$ORIGIN/../nvidia/cu${CUDAToolkit_VERSION_MAJOR}/lib;${_nvjpeg_dir}")
  message(STATUS "speciesclf: nvJPEG: ${SPECIESCLF_NVJPEG_LIBRARY}")
else()
  message(STATUS "speciesclf: nvJPEG not found: the GPU path decodes on the CPU (set SPECIESCLF_NVJPEG_ROOT)")
endif()
install(TARGETS _native_cuda LIBRARY DESTINATION speciesclf)
set(SPECIESCLF_CUDA_BUILT ON)
message(STATUS "speciesclf: CUDA ${CUDAToolkit_VERSION}: built for ${SPECIESCLF_CUDA_ARCHITECTURES}")
