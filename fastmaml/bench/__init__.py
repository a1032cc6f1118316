"""The benchmark suite: fastmaml against a plain autograd loop, torch.func and the meta-learning
libraries people use (learn2learn, higher, TorchOpt), on time per meta-step, peak memory and the
meta-gradient's error against float64, with the FLOP floor.

    fastmaml bench [--quick] [--out DIR] [--workloads ...] [--impls ...] [--device cpu|cuda]
    from fastmaml.bench.suite import run_suite

Modules: workloads (problems), impls (implementations), peers (optional imports), measure (timing,
gradients), memory (peak memory in a subprocess), flops (the floor), report (Markdown, JSON, plots),
suite (the run and the command-line arguments).
"""
