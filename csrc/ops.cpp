// Schemas of the crossbar_torch custom ops and the `crossbar_torch._C` Python module.
//
// `check_values`: check the values of the tensors (levels in range, the sort index a
// permutation, finite floats), which costs a pass over them and, on CUDA, a host
// synchronisation; a crossbar layer passes false for tensors it has already checked since
// they last changed (crossbar_torch/nn/modules/base.py). Shapes, dtypes and devices are always
// checked.
//
// Kernels are registered per device in cpu/<op>_kernel.cpp and cuda/<op>_kernel.cu (the latter
// only in builds WITH_CUDA); fake (meta) kernels are registered in Python
// (crossbar_torch/ops/__init__.py). Semantics: docs/semantics.md and crossbar_torch/ops/reference.py
// (analog_matmul: crossbar_torch/ops/analog_reference.py).
#include <Python.h>

#include <torch/library.h>

extern "C" {
// Importing crossbar_torch._C loads this library, which runs the TORCH_LIBRARY static
// initializers below; the module itself is empty (pytorch/extension-cpp style).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(crossbar_torch, m) {
  m.def("encode(Tensor q, int weight_bits, int bits_per_cell, int encoding) -> Tensor");
  m.def(
      "decode(Tensor cells, int weight_bits, int bits_per_cell, int encoding, "
      "bool check_values=True) -> Tensor");
  m.def(
      "effective_weight(Tensor cells, Tensor index, Tensor scale, int weight_bits, "
      "int bits_per_cell, int encoding, bool check_values=True) -> Tensor");
  m.def(
      "sort_and_encode(Tensor w, Tensor scale, Tensor index, int weight_bits, "
      "int bits_per_cell, int encoding, bool check_values=True) -> Tensor");
  m.def(
      "program_layer(Tensor cells, Tensor filter_index, Tensor order, Tensor pinned, "
      "Tensor(a!) state, Tensor(b!) written, Tensor stuck, Tensor(c!) cell_writes, "
      "int tile_offset, int rows, int cols, int weight_bits, int bits_per_cell, int encoding, "
      "bool stuck_initial, bool count_cells, int compensate_slices, int window) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "compensate(Tensor cells, Tensor held, Tensor old, int weight_bits, int bits_per_cell, "
      "int encoding, int compensate_slices, bool check_values=True) -> Tensor");
  m.def(
      "feedback_quantize(Tensor target, Tensor u, Tensor held, Tensor levels, int weight_bits, "
      "int bits_per_cell, int encoding, int stuck_slices, Tensor pred, Tensor sort_index, "
      "float write_penalty=0., Tensor? filter_weight=None) -> (Tensor, Tensor)");
  // host only (no CUDA kernel): rule 24 refines rule 21's targets, which are computed on the
  // host (crossbar_torch/feedback.py)
  m.def(
      "feedback_refine(Tensor target, Tensor hs, Tensor q, Tensor pred, Tensor sort_index, "
      "int weight_bits, int bits_per_cell, int encoding, float write_penalty, int sweeps, "
      "Tensor? filter_weight=None) -> (Tensor, Tensor)");
  // host only: rule 21's factor U D U^T of each group's damped input moment (float64; on the
  // host, one thread, as rule 21 computes it: crossbar_torch/feedback.py)
  m.def("feedback_factor(Tensor moment, float damp) -> Tensor");
  // host only (no CUDA kernel): filter placement is chosen at conversion, on the host
  m.def("chain_order(Tensor bits, int start) -> Tensor");
  // host only: independent products, each on one thread, the pool's threads sharing them
  // (rule 21's moments and the layers' products while calibrating: the same bits on every
  // thread count; crossbar_torch/threads.py)
  m.def("one_thread_each(Tensor[] a, Tensor[] b, Tensor? bias, bool linear, bool stacked=False) "
        "-> Tensor[]");
  // host only: per-row stable descending order of int32 keys (rule 4's sort index)
  m.def("sort_index(Tensor key) -> Tensor");
  // host only: the packed storage of cell levels and stuck flags (crossbar_torch/packing.py,
  // whose torch ops run on a device)
  m.def("pack_levels(Tensor levels, int bits_per_cell) -> Tensor");
  m.def("unpack_levels(Tensor packed, int cells, int bits_per_cell) -> Tensor");
  m.def(
      "analog_matmul(Tensor x, Tensor g, Tensor sort_index, Tensor cell_weight, "
      "Tensor adc_steps, int groups, int rows, int input_bits, int input_bits_per_cycle, "
      "float input_scale, int adc_bits, float g0, float encoding_offset, bool signed_weights, "
      "bool check_values=True) "
      "-> (Tensor, Tensor)");
}
