"""The hardened YAML loader: plain data only, bounded in size, depth and values, no key given twice.

A spec is a page of YAML. These bounds are far above any real one and keep a hostile one (a
billion-laughs alias bomb, 10,000 nested brackets, a 1 GB file) from eating time or memory:
PyYAML's pure-Python loader needs about 65 us per value: the worst accepted text takes 1-3 s.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_SPEC_CHARS = 250_000
MAX_DEPTH = 32  # nesting, counted after aliases are expanded
MAX_NODES = 20_000  # scalars, lists and mappings, counted after aliases are expanded


def compose(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (it has the lines) and its data. Raises yaml.YAMLError, with a
    ``problem_mark`` where a line is to blame."""
    loader = _SpecLoader(text)  # reads the text at once: a NUL byte is refused here
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_tree(root)
        return root, loader.construct_document(root)
    finally:
        loader.dispose()


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain scalars, lists and mappings only: ``!!python/...`` tags are
    refused), made to stop at MAX_DEPTH before its recursive composer reaches Python's stack limit
    and at MAX_NODES before a long text costs seconds, and to report a bad scalar
    (``!!timestamp 2001-02-30``, a 5,000-digit int) with its line."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        depth = self._depth
        if depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES:,} values in the spec",
                                              self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:  # YAMLError is a plain Exception: not caught
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {exc}", node.start_mark) from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_tree(root: yaml.Node) -> None:
    """Refuses recursive aliases, trees that aliases expand past MAX_NODES or MAX_DEPTH (the
    billion-laughs bomb: 9 aliases to 9 aliases to ... is tiny as text and huge once expanded),
    and keys given twice in one mapping (YAML keeps the last one silently).

    Each distinct node is visited once and its expanded size and depth are memoised, so this costs
    the size of the text, not of the expansion; the walk uses its own stack, not Python's.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) once aliases are expanded
    open_: set[int] = set()  # nodes whose children are still being measured: meeting one is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = [measured[id(k)] for k in _children(node)]
            size, depth = 1 + sum(n for n, _ in kids), 1 + max((d for _, d in kids), default=0)
            if size > MAX_NODES or depth > MAX_DEPTH:  # the text itself was within both: aliases did it
                what = f"{size:,} values" if size > MAX_NODES else f"{depth} levels of nesting"
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand this to {what}; expected at most {MAX_NODES:,} values "
                    f"and {MAX_DEPTH} levels", node.start_mark)
            measured[key] = (size, depth)
            open_.discard(key)
            continue
        if key in measured:
            continue
        if key in open_:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a collection that contains it",
                                              node.start_mark)
        open_.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node))


def _check_unique_keys(node: yaml.MappingNode) -> None:
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if (key.tag, key.value) in seen:
                raise yaml.composer.ComposerError(None, None, f"key {key.value!r} is given twice in this mapping",
                                                  key.start_mark)
            seen.add((key.tag, key.value))
