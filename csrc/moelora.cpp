// The moelora op library: the schema of every op (single source of truth) and the Python module stub.
// Backends register implementations with TORCH_LIBRARY_IMPL(moelora, CPU/CUDA, m) in their own files.
#include <Python.h>
#include <torch/library.h>

// `import moelora_ext._C` loads this shared library, which runs the static registrations below. The module
// itself has no functions: the ops are reached through torch.ops.moelora.*.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "moelora_ext native ops; use torch.ops.moelora.* or moelora_ext.fused_moe",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(moelora, m) {
  // hidden_states [T, H]; w13 [E, 2I, H] (gate rows then up rows); w2 [E, H, I]; topk_weights [T, k];
  // topk_ids [T, k]; token_lora_ids [T] int32 in [-1, S); w13_lora_a [S, E, R, H]; w13_lora_b [S, E, 2I, R];
  // w2_lora_a [S, E, R, I]; w2_lora_b [S, E, H, R] (a *_shared_* flag drops E); lora_scalings [S] fp32.
  // Returns [T, H] in the dtype of hidden_states.
  m.def(
      "fused_moe(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
      "Tensor? token_lora_ids=None, Tensor? w13_lora_a=None, Tensor? w13_lora_b=None, "
      "Tensor? w2_lora_a=None, Tensor? w2_lora_b=None, Tensor? lora_scalings=None, "
      "bool w13_shared_a=False, bool w13_shared_b=False, bool w2_shared_a=False, bool w2_shared_b=False, "
      "str activation=\"silu\") -> Tensor");
}
