"""``processed_chat_template.json``: the runtime's prefix/suffix view of a chat template.

The runtime does not run Jinja; it wraps each message in a role's prefix and
suffix. We derive those by rendering the model's own template on placeholder
conversations and cutting the renders apart at the placeholders:

- [system S, user U] ends with the user segment, [.., assistant A] adds the
  assistant segment, [.., user U2] adds one more user segment;
- the system segment is what precedes the user segment in the first render;
- the generation prompt is what ``add_generation_prompt`` appends;
- a default system prompt is what the template inserts when none is given;
- for a vision-language model, ``content_types.{image,video}.format`` is what the
  template renders for an image (video) content part between two text parts of one
  user message (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgellm_steps.errors import ChatTemplateError

ROLES = ("system", "user", "assistant")
FIX = "pass --chat_template with a processed template JSON"
_SYS, _USER, _ASSISTANT, _USER2 = "<<SYSTEM_9f1c>>", "<<USER_9f1c>>", "<<ASSISTANT_9f1c>>", "<<USER2_9f1c>>"
_BEFORE, _AFTER = "<<BEFORE_9f1c>>", "<<AFTER_9f1c>>"
#: The media content parts a vision-language template may render.
CONTENT_TYPES = ("image", "video")


def _split(segment: str, placeholder: str, what: str) -> dict[str, str]:
    if segment.count(placeholder) != 1:
        raise ChatTemplateError(f"cannot derive the {what} prefix/suffix from the chat template; " + FIX)
    prefix, suffix = segment.split(placeholder)
    return {"prefix": prefix, "suffix": suffix}


def _after(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise ChatTemplateError(
            f"the chat template re-renders earlier turns when a {what} is appended, so it has no fixed "
            "prefix/suffix form; " + FIX
        )
    return longer[len(shorter) :]


def _content_format(render: Any, kind: str) -> str | None:
    """What the template renders for one ``kind`` content part, or None when it renders none."""
    parts = [{"type": "text", "text": _BEFORE}, {"type": kind}, {"type": "text", "text": _AFTER}]
    try:
        rendered = render([{"role": "user", "content": parts}])
    except ChatTemplateError:
        return None
    if rendered.count(_BEFORE) != 1 or rendered.count(_AFTER) != 1:
        return None
    between = rendered.split(_BEFORE)[1].split(_AFTER)[0]
    # A text-only template that prints the content as is renders the parts list's repr.
    return between if between and "'type'" not in between else None


def process_chat_template(tokenizer: Any, *, vision_language: bool = False) -> dict[str, Any]:
    """Derive the processed template from a HF tokenizer with a ``chat_template``.

    ``vision_language`` adds ``content_types`` for the media parts the template renders
    (none when it renders neither, as a text-only template does).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the checkpoint has no chat template (tokenizer_config.json or chat_template.jinja); " + FIX
        )

    def render(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja raises many types; any failure means the same thing here
            raise ChatTemplateError(
                f"rendering the chat template failed ({type(err).__name__}: {err}); " + FIX
            ) from err

    system, user, assistant, user2 = (
        {"role": "system", "content": _SYS},
        {"role": "user", "content": _USER},
        {"role": "assistant", "content": _ASSISTANT},
        {"role": "user", "content": _USER2},
    )
    first = render([system, user])
    second = render([system, user, assistant])
    third = render([system, user, assistant, user2])
    roles = {
        "assistant": _split(_after(second, first, "assistant turn"), _ASSISTANT, "assistant"),
        "user": _split(_after(third, second, "user turn"), _USER2, "user"),
    }
    user_segment = roles["user"]["prefix"] + _USER + roles["user"]["suffix"]
    if not first.endswith(user_segment):
        raise ChatTemplateError("the chat template renders the first user turn differently from later ones; " + FIX)
    roles["system"] = _split(first[: len(first) - len(user_segment)], _SYS, "system")
    processed: dict[str, Any] = {
        "roles": {role: roles[role] for role in ROLES},
        "generation_prompt": _after(render([system, user], generation_prompt=True), first, "generation prompt"),
        "content_types": {},
    }
    without_system = render([user])
    prefix, suffix = roles["system"]["prefix"], roles["system"]["suffix"]
    body = without_system[: len(without_system) - len(user_segment)]
    if body.startswith(prefix) and body.endswith(suffix) and len(body) > len(prefix) + len(suffix):
        processed["default_system_prompt"] = body[len(prefix) : len(body) - len(suffix)]
    if vision_language:
        formats = {kind: _content_format(render, kind) for kind in CONTENT_TYPES}
        processed["content_types"] = {kind: {"format": fmt} for kind, fmt in formats.items() if fmt}
    return processed


def load_processed_chat_template(path: Path) -> dict[str, Any]:
    """Read and validate a user-given processed template; errors name the missing key."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ChatTemplateError(f"chat template file {path} does not exist; fix the --chat_template path") from err
    except json.JSONDecodeError as err:
        raise ChatTemplateError(f"chat template file {path} is not valid JSON ({err}); fix the file") from err
    if not isinstance(data, dict) or not isinstance(data.get("roles"), dict):
        raise ChatTemplateError(
            f"chat template file {path} lacks a 'roles' object; see processed_chat_template.json in any export"
        )
    for role in ROLES:
        entry = data["roles"].get(role)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("prefix", "suffix")):
            raise ChatTemplateError(
                f"chat template file {path}: roles.{role} needs string 'prefix' and 'suffix'; add them"
            )
    for key in ("generation_prompt", "default_system_prompt"):
        if key in data and not isinstance(data[key], str):
            raise ChatTemplateError(f"chat template file {path}: '{key}' must be a string")
    data.setdefault("content_types", {})
    return data
