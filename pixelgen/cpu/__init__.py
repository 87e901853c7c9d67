"""Everything that exists only to make XLA:CPU fast, behind one seam.

`pixelgen.nn` and `pixelgen.models` never import this package; the code above them applies it
from outside (`pixelgen.cpu.backend`):

- `use_native_attention(model)` gives every attention layer the fused native kernel
  (`native_attention`), which a layer runs only where its step is lowered for the CPU
  (`jax.lax.platform_dependent`), so a TPU or GPU executable built on a CPU host is plain.
  The tasks apply it to each model they build.
- `decode_on_cpu_clients(run, state, shared, per_row, batch_size)` runs a sampler's jitted
  loop on the one-thread decode clients (`decode_clients`: one per core, the batch's rows
  split between them) or, on 2 cores, on both clients with the weights split between them
  (`core_split`); elsewhere, and on GPU and TPU, where the parameters are.
- `decode_ops(model, party, packed)` gives that loop its `DecodeOps`: matmuls over weights
  packed before the loop (`packed_matmul`) and the sums of the two cores' halves.
- `allocator.configure()` sets glibc's allocator so that XLA:CPU reuses freed host memory;
  `import pixelgen` calls it, before JAX's CPU client exists.

`native` builds and loads the C++ kernels (`pixelgen/cpu/native/`) with g++ on first use.

Runtime settings: `config.runtime` (`backend.configure`, which training and `pixelgen.load`
call), each overridden by its environment variable where that is set. This is the one place
they are listed; each is read when a job starts or a function is traced:

- `runtime.native_attention` True (default) | False, or PIXELGEN_NATIVE_ATTENTION=1 | 0: False
  or 0 keeps XLA's tiles instead of the native attention kernel.
- `runtime.cpu_decode` 'cores' (default) | 'rows' | 'shared', or PIXELGEN_CPU_DECODE: how
  samplers decode on a multi-core CPU (`decode_clients`, `core_split`).
- PIXELGEN_MALLOC=reuse (default) | default: glibc's allocator as it comes (`allocator`); an
  environment variable only, since it must act before JAX's CPU client exists.
- CXX: the C++ compiler that builds the native kernels (default g++).
- PIXELGEN_NATIVE_DIR: where the built library is kept (default ~/.cache/pixelgen/native).

This package's __init__ imports nothing, so `import pixelgen` stays light.
"""
