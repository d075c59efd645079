"""Ontology: map SPHINX's free-text phrases to dataset categories.

An ontology lists classes, each with synonyms and optionally the words to put into the detection
prompt. A phrase maps to a class when its normalized form (lower case, no counts, singular; see
``sphinx_tools.parsing.normalize_label``) equals a normalized synonym, when its head words end
with one (``"red car"`` -> ``car``), or when it is a close spelling (``"bicylce"`` -> ``bicycle``).
Unmapped phrases become new categories, or are dropped (``keep_unmapped=False``).

Files (JSON or YAML)::

    {"person": ["man", "woman", "child"], "car": {"synonyms": ["automobile"], "prompt": "cars"}}
    # or a list: ["person", "car"]

Inline (``--classes``): ``"person=man|woman,car=automobile"``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sphinx_tools.parsing import normalize_label

FUZZY_CUTOFF = 0.85


@dataclass
class OntologyClass:
    "One class: its name, synonyms and (optional) prompt wording."

    name: str
    synonyms: list[str] = field(default_factory=list)
    prompt: str | None = None


class Ontology:
    """Classes with synonyms, and the phrase -> class mapping.

    Args:
        classes: the classes, in category order.
        keep_unmapped: phrases that match no class become new categories (their normalized
            form); when false they map to ``None`` (dropped).
        fuzzy: allow close spellings (difflib ratio >= ``FUZZY_CUTOFF``).

    Example:
        >>> onto = Ontology.parse("person=man|woman,car=automobile")
        >>> onto.map("Two Women"), onto.map("a red automobile"), onto.map("tree")
        ('person', 'car', 'tree')
    """

    def __init__(self, classes: list[OntologyClass], keep_unmapped: bool = True,
                 fuzzy: bool = True):
        self.classes = list(classes)
        self.keep_unmapped = keep_unmapped
        self.fuzzy = fuzzy
        self._table: dict[str, str] = {}
        for cls in self.classes:
            for word in [cls.name, *cls.synonyms]:
                key = normalize_label(word)
                if key and key not in self._table:
                    self._table[key] = cls.name
        self._cache: dict[str, str | None] = {}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str, **kwargs) -> "Ontology":
        """From ``"name=syn|syn,name2"``, or a path to a JSON/YAML file.

        Raises:
            ValueError: naming the spec when it is empty or malformed.
        """
        if spec is None or not str(spec).strip():
            raise ValueError(f"ontology spec must name at least one class, got {spec!r}")
        path = Path(str(spec)).expanduser()
        if path.suffix.lower() in (".json", ".yaml", ".yml") and path.is_file():
            return cls.from_file(path, **kwargs)
        classes = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            name, _, syns = part.partition("=")
            if not name.strip():
                raise ValueError(f"class without a name in ontology spec {spec!r}")
            classes.append(OntologyClass(name.strip(), [s.strip() for s in syns.split("|")
                                                        if s.strip()]))
        return cls(classes, **kwargs)

    @classmethod
    def from_file(cls, path, **kwargs) -> "Ontology":
        "Read a JSON/YAML ontology file (see the module docstring for the shapes)."
        text = Path(path).read_text(encoding="utf-8")
        if Path(path).suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        return cls(_classes_from_data(data, path), **kwargs)

    @classmethod
    def from_categories(cls, categories: list[dict], **kwargs) -> "Ontology":
        "One class per COCO category (its name; ``synonyms`` when the category lists them)."
        return cls([OntologyClass(c["name"], list(c.get("synonyms", []))) for c in categories],
                   **kwargs)

    # -- use -----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def prompt_classes(self) -> list[str]:
        "The class names to ask the detector for (each class's ``prompt`` or its name)."
        return [c.prompt or c.name for c in self.classes]

    def map(self, phrase: str) -> str | None:
        "The class of ``phrase``; a new normalized name or ``None`` when nothing matches."
        if phrase not in self._cache:
            self._cache[phrase] = self._map(phrase)
        return self._cache[phrase]

    def _map(self, phrase: str) -> str | None:
        key = normalize_label(phrase or "")
        if not key:
            return None
        if key in self._table:
            return self._table[key]
        words = key.split()
        for k in range(1, len(words)):  # head noun: "red car" -> "car", "traffic light pole"..
            tail = " ".join(words[k:])
            if tail in self._table:
                return self._table[tail]
        if self.fuzzy and self._table:
            close = difflib.get_close_matches(key, list(self._table), n=1, cutoff=FUZZY_CUTOFF)
            if close:
                return self._table[close[0]]
        return key if self.keep_unmapped else None

    def fingerprint(self) -> str:
        "A stable string naming the ontology (part of the work-log key of dependent stages)."
        return json.dumps([[c.name, c.synonyms, c.prompt] for c in self.classes])

    def __repr__(self) -> str:
        return f"Ontology({self.names!r}, keep_unmapped={self.keep_unmapped})"


def _classes_from_data(data, path) -> list[OntologyClass]:
    if isinstance(data, list):
        return [OntologyClass(str(name)) for name in data]
    if not isinstance(data, dict):
        raise ValueError(f"ontology file {path} must hold a list or a mapping, got "
                         f"{type(data).__name__}")
    classes = []
    for name, value in data.items():
        if value is None:
            classes.append(OntologyClass(str(name)))
        elif isinstance(value, str):
            classes.append(OntologyClass(str(name), [value]))
        elif isinstance(value, list):
            classes.append(OntologyClass(str(name), [str(v) for v in value]))
        elif isinstance(value, dict):
            classes.append(OntologyClass(str(name), [str(v) for v in value.get("synonyms", [])],
                                         value.get("prompt")))
        else:
            raise ValueError(f"ontology file {path}: class {name!r} has a bad value {value!r}")
    return classes
