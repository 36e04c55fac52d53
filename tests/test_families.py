"""Each model family is one class in families.py: no other module compares a family's name or reads
the tables that held what differs between families before."""

import ast
import glob
import os

import pytest

import families
from conftest import ROOT

# The module-level tables the family classes replaced.
OLD_TABLES = {"FAMILY_DEFAULTS", "LORA_TARGETS", "LOAD_KWARGS", "FLOW_FAMILIES", "DENOISERS", "TEXT_ENCODERS"}
FAMILY_NAMES = {family.name for family in families.FAMILIES}


def _is_family(node: ast.AST) -> bool:
    """`family`, `x.family`, or the name of either (`family.name`, `model.family.name`)."""
    if isinstance(node, ast.Attribute) and node.attr == "name":
        node = node.value
    return (isinstance(node, ast.Name) and node.id == "family") or (isinstance(node, ast.Attribute)
                                                                     and node.attr == "family")


def _names_a_family(node: ast.AST) -> bool:
    """A family's name as a string, alone or in a tuple, list or set."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(map(_names_a_family, node.elts))
    return isinstance(node, ast.Constant) and node.value in FAMILY_NAMES


def _is_none(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def family_dispatch(source: str) -> list[str]:
    """The places in `source` that branch on which family a model is: a comparison of a family (or its
    name) with anything, a family name compared with anything, an isinstance test against a family
    class, and the old tables."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops) and _is_none(node.comparators[-1]):
                continue  # whether there is a family at all
            if any(_is_family(op) or _names_a_family(op) for op in operands):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance" and len(node.args) == 2:
            if "families." in ast.unparse(node.args[1]) or _is_family(node.args[0]):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in OLD_TABLES or ast.unparse(node) == "models.FAMILIES":
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("snippet", [
    'if model.family == "sd3":\n    pass',
    'flow = family in ("sd3",)',
    'if model.family.name != "sdxl":\n    pass',
    'if "sd" == name:\n    pass',
    'sdxl = isinstance(model.family, families.SDXL)',
    'targets = models.LORA_TARGETS[family]',
    'defaults = FAMILY_DEFAULTS[name]',
    'family = models.FAMILIES[class_name]',
])
def test_the_check_finds_a_family_dispatch(snippet):
    assert family_dispatch(snippet), snippet


def test_no_module_but_families_compares_a_family():
    modules = sorted(glob.glob(os.path.join(ROOT, "*.py")))
    assert os.path.join(ROOT, "families.py") in modules and os.path.join(ROOT, "models.py") in modules
    found = {os.path.basename(path): family_dispatch(open(path).read())
             for path in modules if os.path.basename(path) != "families.py"}
    assert {name: places for name, places in found.items() if places} == {}


def test_each_pipeline_class_and_each_name_is_one_family():
    names = families.pipeline_names()
    assert len(names) == len(set(names)) and len(FAMILY_NAMES) == len(families.FAMILIES)
    assert all(name in families.of_pipeline(name).pipelines for name in names)
    assert families.of_pipeline("UnknownPipeline") is None
