"""Programmatic judges for tests (iterate.py --judge-fn prog_judges:NAME)."""


def letters(prompt, response):
    """Prefers answers made of lowercase ASCII letters: 5 x their share of the characters."""
    if not response:
        return 0.0
    return 5.0 * sum("a" <= c <= "z" for c in response) / len(response)


def too_high(prompt, response):
    """A broken judge: a score outside the rubric's 0-5 range."""
    return 7.0


def shorter(prompt, response):
    """Prefers short answers: 5 for an empty one, 1 point less per 40 characters, never below 0."""
    return max(0.0, 5.0 - len(response) / 40)


def constant(prompt, response):
    """A judge that tells nothing apart: every prompt's responses tie, so no actor pair is made."""
    return 2.5
