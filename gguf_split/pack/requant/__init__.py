"""Re-derived quantizations: llama.cpp's quantizers ported so that a pack stores a published quant as the
(usually empty) difference from our re-quantization of its full-precision source (issue 22).

Modules: `port` (the quantizers in numpy, vectorised across blocks: the reference engine); `kernels`
(the numba engine, optional: the same bytes an order of magnitude faster, the scale searches vectorised
across blocks); `engine` (`quantize`: which engine, how many threads; the bytes depend on neither);
`residual` (a published quant as its difference from the prediction, in the quantizer's own terms). See docs/requant.md for the design notes and measurements.
"""

from .engine import ENGINES, default_threads, numba_available, quantize
from .port import HEADER_BYTES, REQUANT_TYPES, RequantError, check_source, codes_from_headers, row_bytes

__all__ = ["ENGINES", "HEADER_BYTES", "REQUANT_TYPES", "RequantError", "check_source", "codes_from_headers",
           "default_threads", "numba_available", "quantize", "row_bytes"]
