"""The Triton model's inputs, outputs and limits: the contract between the config.pbtxt that
``triton_repo`` writes and the model code (``triton_requests``, ``triton_model``) that reads requests.

Every input is one value per batch row (dims ``[1]``): ``IMAGE`` (the picture's file bytes) is
required; the prompt fields and decoding options are optional. The decoding options may instead
come as request parameters (``PARAMETERS``: the GenerationOptions field names, one value for every
row of the request): Triton batches only requests that send the same set of inputs, and parameters
are not part of that set. Kept apart so that writing a repository needs nothing beyond the base
install.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.errors import InputError

IMAGE = "IMAGE"
TEXT_FIELDS = ("PROMPT", "TASK", "LANG", "QUESTION", "OBJECTS")
# input name -> (Triton type, GenerationOptions field)
OPTION_FIELDS = {
    "MAX_NEW_TOKENS": ("TYPE_INT32", "max_new_tokens"),
    "TEMPERATURE": ("TYPE_FP32", "temperature"),
    "TOP_K": ("TYPE_INT32", "top_k"),
    "TOP_P": ("TYPE_FP32", "top_p"),
    "SEED": ("TYPE_INT64", "seed"),
}
INPUTS = (IMAGE, *TEXT_FIELDS, *OPTION_FIELDS)
# request parameter -> the input it stands for (the same option)
PARAMETERS = {option: name for name, (_, option) in OPTION_FIELDS.items()}
# output name -> (Triton type, dims): the answer, its generated ids (eos excluded), run --json's object
OUTPUTS = {"TEXT": ("TYPE_STRING", "1"), "TOKEN_IDS": ("TYPE_INT32", "-1"), "RESULT": ("TYPE_STRING", "1")}


@dataclass(frozen=True)
class ServingLimits:
    """What the model accepts; written into config.pbtxt's parameters, read back by the model."""

    max_new_tokens: int = 256  # cap on a row's MAX_NEW_TOKENS
    default_max_new_tokens: int = 128  # when a row gives none (as ``serve``)
    max_image_pixels: int = 40_000_000

    def __post_init__(self):
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            raise InputError(f"the default max_new_tokens ({self.default_max_new_tokens}) must be 1.."
                             f"{self.max_new_tokens} (the cap)")
        if self.max_image_pixels < 1:
            raise InputError(f"max_image_pixels must be at least 1, got {self.max_image_pixels}")

    def parameters(self) -> dict[str, str]:
        return {"max_new_tokens": str(self.max_new_tokens), "default_max_new_tokens": str(self.default_max_new_tokens),
                "max_image_pixels": str(self.max_image_pixels)}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "ServingLimits":
        return cls(**{key: int(parameters[key]) for key in ("max_new_tokens", "default_max_new_tokens",
                                                             "max_image_pixels")})
