"""Update compression: a client encodes its update, the coordinator decodes it (DESIGN.md: "an encode/decode pair
around the update on its way through the executor").

* :mod:`.sparsify` top-k (Aji & Heafield 2017; Lin et al., ICLR 2018) and random-k (Stich et al., NeurIPS 2018)
* :mod:`.quantize` stochastic blockwise quantisation to 8/4/2 bits, unbiased (QSGD, Alistarh et al., NeurIPS 2017)
* :mod:`.pipeline` composition (``topk:0.01+q8``), the compressed form :class:`Packed`, :func:`decompress`
* :mod:`.feedback` error feedback (Karimireddy et al., ICML 2019), the client's residual

On the wire a Packed is a compressed UPDATE (:mod:`fedopt.wire.compressed`), validated like every frame before
anything is allocated. ``--compress SPEC`` turns it on; error feedback is on for biased compressors (a sparsifier)
unless ``--no-error-feedback``. ``--compress-down q8`` sends each round's model as 8-bit blockwise codes (NVFlare's
BLOCKWISE8 filter, Dettmers et al.'s blockwise scales) in a compressed TRAIN; the coordinator's own model stays exact.
"""

from ..errors import ConfigError
from .feedback import ErrorFeedback, Memory
from .pipeline import DEFAULT_BLOCK, Compressor, Packed, decoded, decompress, parse_compressor

__all__ = ["Compressor", "Packed", "ErrorFeedback", "Memory", "parse_compressor", "decoded", "decompress",
           "DEFAULT_BLOCK", "uplink", "downlink"]


def uplink(spec: str | None, error_feedback: bool, store_factory) -> ErrorFeedback | None:
    """The client side of ``--compress SPEC``: None when off; error feedback (a store from ``store_factory()``)
    when the compressor is biased and ``error_feedback`` is on."""
    if spec is None:
        return None
    c = parse_compressor(spec)
    return ErrorFeedback(c, store_factory() if c.biased and error_feedback else None)


def downlink(spec: str | None) -> Compressor | None:
    """The coordinator side of ``--compress-down SPEC``: a value codec (``q8[:B]``, ``q4``, ``q2``, ``fp16``) for the
    model in TRAIN, or None when off. A model travels whole, so a sparsifier is refused (ConfigError naming the
    flag). ``downlink(spec).compress(model, round)``: every client of a round gets the same codes."""
    if spec is None:
        return None
    c = parse_compressor(spec, "--compress-down")
    if c.sparsify is not None:
        raise ConfigError(f"--compress-down {spec!r}: a model is sent whole; use a value codec (q8, q4, q2, fp16)")
    return c
