"""YAML with line numbers: one parse gives values and the nodes that know their lines.

Config errors must name the line, and plain `yaml.safe_load` values have
forgotten where they came from. Composing nodes first and constructing values
from the same nodes keeps both, and lets one walk refuse what values would hide:
a repeated key (YAML keeps the last silently) and a literal `api_key`.
"""

from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pipeline.errors import ConfigError

__all__ = ["KeyPath", "Lines", "parse", "render"]

KeyPath = tuple[str | int, ...]


def parse(file: str, text: str) -> tuple[Node | None, object]:
    """Compose nodes and construct values in one parse; refuse duplicate keys and api_key.

    The YAML error's snippet is left out of the message: it quotes the line, which
    may hold a secret.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _scan(file, root, (), set())
        return root, (loader.construct_document(root) if root is not None else None)
    except yaml.MarkedYAMLError as exc:
        mark, start = exc.problem_mark or exc.context_mark, exc.context_mark
        context = str(exc.context or "")
        if context and start is not None and mark is not None and start.line != mark.line:
            context += f" started at line {start.line + 1}"
        words = "; ".join(part for part in (context, str(exc.problem or "")) if part)
        column = f" at column {mark.column + 1}" if mark is not None else ""
        line = mark.line + 1 if mark is not None else None
        expected = f"valid YAML ({words}{column})"
        raise ConfigError(file, "", expected, line=line, show_got=False) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(file, "", "valid YAML", show_got=False) from exc
    finally:
        loader.dispose()


def _scan(file: str, node: Node, at: KeyPath, seen: set[int]) -> None:
    """Walk the node tree once for the mistakes that plain values would hide."""
    if id(node) in seen:  # an alias: already checked where it was defined
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _scan(file, item, (*at, index), seen)
    elif isinstance(node, MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key == "api_key":
                expected = (
                    "no api_key: secrets come from the environment, "
                    "use api_key_env naming a variable that holds the key"
                )
                raise ConfigError(file, render((*at, key)), expected, line=line, show_got=False)
            if key in first and key != "<<":
                expected = f"each key once per mapping (first at line {first[key]})"
                raise ConfigError(file, render((*at, key)), expected, line=line, show_got=False)
            first[key] = line
            _scan(file, value_node, (*at, key), seen)


class Lines:
    """Maps a key path such as ("stages", 2, "pool", "size") to its line in the file.

    Walks the composed node tree as far as the path exists and returns the line of
    the deepest node found, so a missing key is reported at its parent mapping.
    """

    def __init__(self, root: Node | None) -> None:
        self._root = root

    def line(self, at: KeyPath, *, of_key: bool = False) -> int | None:
        node = self._root
        if node is None:
            return None
        line = node.start_mark.line + 1
        for depth, part in enumerate(at):
            found: tuple[Node, Node] | None = None
            if isinstance(node, MappingNode):
                for key_node, value_node in node.value:  # the last duplicate wins, as in YAML
                    if isinstance(key_node, ScalarNode) and key_node.value == str(part):
                        found = (key_node, value_node)
            elif (
                isinstance(node, SequenceNode) and isinstance(part, int) and part < len(node.value)
            ):
                found = (node.value[part], node.value[part])
            if found is None:
                return line
            key_node, node = found
            last = depth == len(at) - 1
            line = (key_node if of_key and last else node).start_mark.line + 1
        return line


def render(at: KeyPath) -> str:
    """("stages", 2, "pool", "size") -> "stages[2].pool.size"."""
    text = ""
    for part in at:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
