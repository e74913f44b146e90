"""paligemma-edge: PaliGemma from a Hugging Face checkpoint to a fast offline program.

    import paligemma_edge
    model = paligemma_edge.load("bundle/")
    print(model.generate("cat.jpg", "caption en").text)
    stream = model.stream("cat.jpg", "caption en")   # TokenChunks as they come...
    for chunk in stream:
        print(chunk.text, end="")
    stream.result                                    # ...then the same result generate() gives

Importing this package loads only the runtime (numpy, pillow, tokenizers, onnxruntime);
export needs the ``export`` extra and is imported on use.
"""

from .runtime.errors import BundleError, InputError, PaliGemmaEdgeError
from .runtime.generation.mask_decoder import MaskDecoder
from .runtime.model import PaliGemma, load
from .runtime.generation.parsing import Detection, Segmentation, parse_detections, parse_segmentations
from .runtime.generation.results import DetectionResult, Generation, SegmentationResult, Timings, TokenChunk
from .runtime.generation.sampling import GenerationOptions
from .runtime.generation.streams import Stream
from .runtime.generation.tasks import LANGUAGES, build_prompt

__all__ = [
    "BundleError", "Detection", "DetectionResult", "Generation", "GenerationOptions", "InputError", "LANGUAGES",
    "MaskDecoder", "PaliGemma", "PaliGemmaEdgeError", "Segmentation", "SegmentationResult", "Stream",
    "Timings", "TokenChunk", "build_prompt", "load", "parse_detections", "parse_segmentations",
]
