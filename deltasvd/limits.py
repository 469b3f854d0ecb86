"""Limits of the codecs' options, in a module of their own so that the command line can check
them without importing torch."""

DCT_MAX_BITS = 8       # dct: most bits per parameter a patch can get
FACTOR_MAX_BITS = 8    # qsvd: widest quantized factor component
# --max-error: about the relative error the storage rounding of factors adds by itself; the
# allocation aims this far below the target, and a target below it is refused (measured on the
# t2i pair: fp16 factors add about 4e-4).
STORAGE_ROUNDING = {"fp16": 0.002, "bf16": 0.01, "fp32": 1e-5}
