"""How a dataset prompt becomes model input: one template for every step and the demo."""

from __future__ import annotations


def format_prompt(prompt: str, instruction: str = "") -> str:
    """``"<instruction> <prompt>\\nBullet:"``; the response follows after a space."""
    head = f"{instruction.strip()} " if instruction.strip() else ""
    return f"{head}{prompt.strip()}\nBullet:"


def format_response(response: str) -> str:
    return " " + response.strip()
