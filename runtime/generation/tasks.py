"""PaliGemma's task prefixes as data: one template per task, checked arguments, exact prompt strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import InputError

# big_vision's coco35l languages, the ones PaliGemma's mix checkpoints were trained on.
LANGUAGES = frozenset(
    "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt ro ru sv sw te th tr uk vi zh".split()
)
OBJECT_SEPARATOR = " ; "


@dataclass(frozen=True)
class Task:
    name: str
    template: str  # str.format fields: lang, question, objects
    result: str  # "text", "detections" or "segmentations"

    @property
    def uses_lang(self) -> bool:
        return "{lang}" in self.template

    @property
    def uses_question(self) -> bool:
        return "{question}" in self.template

    @property
    def uses_objects(self) -> bool:
        return "{objects}" in self.template


TASKS = {
    task.name: task
    for task in (
        Task("caption", "caption {lang}", "text"),
        Task("describe", "describe {lang}", "text"),
        Task("ocr", "ocr", "text"),
        Task("answer", "answer {lang} {question}", "text"),
        Task("detect", "detect {objects}", "detections"),
        Task("segment", "segment {objects}", "segmentations"),
    )
}


def _one_line(text: str, what: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"{what} must be text, got {type(text).__name__}")
    return " ".join(text.split())  # a prefix is one line: newlines and runs of spaces become one space


def check_lang(lang: str) -> str:
    if not isinstance(lang, str) or lang not in LANGUAGES:
        raise InputError(f"unknown language code '{lang}'; PaliGemma knows: {' '.join(sorted(LANGUAGES))}")
    return lang


def split_objects(objects: str | Sequence[str]) -> list[str]:
    """A list of names, or one string of names separated by ';' -> cleaned names (at least one)."""
    if isinstance(objects, str):
        names = objects.split(";")
    else:
        names = list(objects)
        if any(isinstance(n, str) and ";" in n for n in names):
            raise InputError("object names cannot contain ';' (it separates objects)")
    cleaned = [name for name in (_one_line(n, "an object name") for n in names) if name]
    if not cleaned:
        raise InputError("give at least one object name to detect or segment")
    return cleaned


def build_prompt(task_name: str, lang: str | None = None, question: str | None = None,
                 objects: str | Sequence[str] | None = None) -> str:
    """The exact prefix string for a task, e.g. ``detect cat ; dog``; ``lang`` defaults to en.

    An argument the task does not take is an error rather than silently ignored."""
    task = TASKS.get(task_name)
    if task is None:
        raise InputError(f"unknown task '{task_name}'; choose from: {', '.join(TASKS)}")
    for given, used, flag in ((lang, task.uses_lang, "language"), (question, task.uses_question, "question"),
                              (objects, task.uses_objects, "objects")):
        if given is not None and not used:
            raise InputError(f"the {task.name} task takes no {flag}")
    fields = {}
    if task.uses_lang:
        fields["lang"] = check_lang("en" if lang is None else lang)
    if task.uses_question:
        question = _one_line(question or "", "the question")
        if not question:
            raise InputError("the answer task needs a question")
        fields["question"] = question
    if task.uses_objects:
        fields["objects"] = OBJECT_SEPARATOR.join(split_objects(objects or []))
    return task.template.format(**fields)


def result_kind(prompt: str) -> str:
    """What a prompt's answer holds: free prompts starting with 'detect ' or 'segment ' get parsed too."""
    for task in TASKS.values():
        if task.result != "text" and prompt.startswith(task.template.split("{")[0]):
            return task.result
    return "text"


def _given(value: str | None) -> str | None:
    """A request field's text, or None where it is absent or blank."""
    return None if value is None or not value.strip() else value


def resolve_prompt(prompt: str | None, task: str | None, lang: str | None, question: str | None,
                   objects: str | None) -> str:
    """The prompt of a request that gives either a free ``prompt`` or a ``task`` with its fields (serve, Triton);
    blank fields count as absent."""
    prompt, task, lang, question, objects = map(_given, (prompt, task, lang, question, objects))
    if prompt is not None and task is not None:
        raise InputError("give either 'prompt' or 'task', not both")
    if task is not None:
        return build_prompt(task.strip(), lang=None if lang is None else lang.strip(), question=question,
                            objects=objects)
    if not (lang is None and question is None and objects is None):
        raise InputError("'lang', 'question' and 'objects' go with 'task'")
    if prompt is None:
        raise InputError("give a 'prompt' or a 'task'")
    return prompt.strip()
