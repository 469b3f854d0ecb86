"""Limits of the codecs' options, in a module of their own so that the command line can check
them without importing torch."""

DCT_MAX_BITS = 8       # dct: most bits per parameter a patch can get
FACTOR_MAX_BITS = 8    # qsvd: widest quantized factor component
