/* sfive_ngxlua._speedups: the optional C accelerator of records.py (skeleton). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define SPEEDUPS_VERSION 1

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "C accelerator of sfive_ngxlua.records (optional).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "VERSION", SPEEDUPS_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
