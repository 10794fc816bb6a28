// The Python module diffusion_fast._C. Importing it runs the TORCH_LIBRARY_IMPL blocks
// (registration.cpp, registration_cuda.cu) that attach our kernels to the op schemas
// defined in Python (diffusion_fast/ops/). Its only attribute, WITH_CUDA, says whether
// the CUDA kernels were compiled in.
#include <Python.h>

static struct PyModuleDef diffusion_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&diffusion_fast_c_module);
#ifdef DIFFUSION_FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
