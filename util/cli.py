"""Command-line value parsing that several entry points share."""
import json

from util.errors import UserError


def parse_json_object(text: str, flag: str, example: str = '{"depth": 2}') -> dict:
    """`text` parsed as a JSON object (e.g. --model_kwargs overrides of a preset's constructor).

    Raises `UserError` with one sentence naming `flag` when the text is not JSON or not an object.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{flag} is not valid JSON ({error.msg}); pass an object such as '{example}'.") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object of constructor arguments, e.g. '{example}'.")
    return value
