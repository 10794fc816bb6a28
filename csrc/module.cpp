// The Python module diffusion_fast._C. Importing it runs the TORCH_LIBRARY_IMPL blocks
// (registration.cpp, registration_cuda.cu) that attach our kernels to the op schemas
// defined in Python (diffusion_fast/ops/). It exposes nothing else.
#include <Python.h>

static struct PyModuleDef diffusion_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&diffusion_fast_c_module); }
