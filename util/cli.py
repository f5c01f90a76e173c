"""Command-line value parsing that several entry points share."""
import json


def parse_json_object(text: str, flag: str, example: str = '{"depth": 2}') -> dict:
    """`text` parsed as a JSON object (e.g. --model_kwargs overrides of a preset's constructor).

    Raises ValueError with one sentence naming `flag` when the text is not JSON or not an object;
    callers that have their own error class re-raise it with the same message.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} is not valid JSON ({error.msg}); pass an object such as '{example}'.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object of constructor arguments, e.g. '{example}'.")
    return value
