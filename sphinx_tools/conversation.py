"""SPHINX conversation template (LLaMA2-Accessory `conv_v1_2`) as pure string functions.

A one-turn prompt is ``SYSTEM + "\\n\\n### Human: {q}\\n### Assistant:"``; earlier answers are put back
verbatim and a response ends at ``"\\n###"``.
"""

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
RESPONSE_END = "\n###"


def build_prompt(qas: list, system: str = SYSTEM) -> str:
    """Build the conversation prompt.

    Args:
        qas: ``[[question, answer], ..., [question, None]]``; the last answer must be ``None``
            (the one the model writes).
        system: the system text that opens the conversation.

    Returns:
        The full prompt string, ending with ``"### Assistant:"``.
    """
    if not qas:
        raise ValueError("`qas` must hold at least one [question, answer] pair, got an empty list")
    parts = [system, "\n\n"]
    for i, qa in enumerate(qas):
        if len(qa) != 2:
            raise ValueError(f"each turn must be [question, answer], got {qa!r} at position {i}")
        q, a = qa
        if a is None and i != len(qas) - 1:
            raise ValueError(f"only the last turn may have answer None, turn {i} has none")
        parts.append(f"### Human: {q}\n### Assistant:")
        if a is not None:
            parts.append(f" {a}\n")
    return "".join(parts)


def cut_at_separator(text: str, stop: str = RESPONSE_END) -> str:
    "Cut a raw model continuation at the response end signal and strip it."
    i = text.find(stop)
    return (text if i < 0 else text[:i]).strip()
