"""What storing error texts per identifier costs (issue 21, item 6): `core.redaction.confine`
runs for every batch record, dead letter and history text a failed post writes — the text
for the batch's record with the rest of the request's identifiers masked, and the one for
its members' histories with all of them masked.

    .venv/bin/python -m bench.error_texts

Prints the time per batch (both texts) for texts Braze and the transport give, over a
request of 50 identifiers (one v1 batch, or a v2 pack): "before" is the text stored as it
came (no work), so the figure is the whole added cost. Deliveries carry no text and cost
nothing.
"""

from __future__ import annotations

import argparse
import timeit

from core.redaction import confine


def texts(identifiers: list[tuple[str, str]]) -> dict[str, str]:
    values = [value for _, value in identifiers]
    named = "; ".join(f"Invalid email: {value}" for value in values[::5])
    return {
        "a 503 (names no one)": "HTTP 503: Service unavailable",
        "a 400 naming one identifier": f"HTTP 400: Invalid email: {values[7]}",
        "a 2xx whose errors name 10": f"HTTP 201 errors: {named}",
        "a refusal quoted later (no identifiers known)": f"group refused: {named}",
    }


def run(args: argparse.Namespace) -> dict[str, float]:
    identifiers = [("email", f"user{n}@example.com") for n in range(args.identifiers)]
    own = [value for _, value in identifiers[: args.identifiers // 2]]
    figures: dict[str, float] = {}
    for name, text in texts(identifiers).items():
        known = [] if name.startswith("a refusal") else identifiers

        def both(text: str = text, known: list[tuple[str, str]] = known) -> None:
            confine(text, known, keep=own)
            confine(text, known)

        seconds = min(timeit.repeat(both, number=args.number, repeat=5)) / args.number
        figures[name] = round(seconds * 1e6, 1)
        print(f"{name:48} before 0 µs   now {figures[name]:8.1f} µs per batch")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identifiers", type=int, default=50)
    parser.add_argument("--number", type=int, default=2000)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
