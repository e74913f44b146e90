"""paligemma-edge: PaliGemma from a Hugging Face checkpoint to a fast offline program.

    import paligemma_edge
    model = paligemma_edge.load("bundle/")
    print(model.generate("cat.jpg", "caption en").text)

Importing this package loads only the runtime (numpy, pillow, tokenizers, onnxruntime);
export needs the ``export`` extra and is imported on use.
"""

from .runtime.errors import BundleError, InputError, PaliGemmaEdgeError
from .runtime.model import Generation, PaliGemma, Timings, TokenChunk, load
from .runtime.sampling import GenerationOptions

__all__ = [
    "BundleError", "Generation", "GenerationOptions", "InputError", "PaliGemma", "PaliGemmaEdgeError",
    "Timings", "TokenChunk", "load",
]
