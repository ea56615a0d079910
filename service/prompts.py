"""What the model is asked, and the image placeholders read back out of its answer.

Placeholder syntax (documented in the README): `[[image:N]]` places the N-th selected image
(1-based, in the order of `selectedImageUrls`); `[[image: a short description]]` marks where a
new image would help. `done.imagePlaceholders` lists every placeholder as written, in order of
appearance, duplicates included, so a client can replace them one by one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

GENERATE_SYSTEM_PROMPT: Final = (
    "You are a careful writer of clear, well-structured articles in Markdown. "
    "Where an image belongs, put a placeholder on a line of its own: [[image:N]] places the "
    "N-th selected image the user supplied (counting from 1); [[image: short description]] "
    "marks where a new image would help. Use no other image syntax."
)

PLACEHOLDER_RE: Final = re.compile(r"\[\[image:[^\[\]\n]{1,200}\]\]")


def extract_placeholders(text: str) -> list[str]:
    """Every `[[image:...]]` placeholder in `text`, in order of appearance."""
    return PLACEHOLDER_RE.findall(text)


def generate_messages(
    prompt: str, selected: Sequence[str], reference: Sequence[str]
) -> list[dict[str, Any]]:
    """Chat messages for one generation: the system prompt, then the user's prompt and images."""
    system = {"role": "system", "content": GENERATE_SYSTEM_PROMPT}
    if not selected and not reference:
        return [system, {"role": "user", "content": prompt}]
    notes = []
    if selected:
        notes.append(
            f"Selected images to place in the article: the first {len(selected)} image(s) "
            f"attached, as [[image:1]] to [[image:{len(selected)}]]."
        )
    if reference:
        notes.append(
            f"Reference images for context only, not to be placed: the last {len(reference)} "
            "image(s) attached."
        )
    parts: list[dict[str, Any]] = [{"type": "text", "text": prompt + "\n\n" + " ".join(notes)}]
    parts.extend(
        {"type": "image_url", "image_url": {"url": url}} for url in (*selected, *reference)
    )
    return [system, {"role": "user", "content": parts}]


IMAGE_TOKENS: Final = 85  # what a low-detail image costs OpenAI models; a floor for any image


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    """A prompt's size in tokens, estimated before the upstream counts it: 4 characters a token,
    85 an image, 4 a message for the chat framing. Settled against the upstream's usage later."""
    total = 0
    for message in messages:
        total += 4
        content = message.get("content")
        if isinstance(content, str):
            total += len(content) // 4 + 1
            continue
        for part in content or []:
            if part.get("type") == "text":
                total += len(part.get("text", "")) // 4 + 1
            else:
                total += IMAGE_TOKENS
    return total
