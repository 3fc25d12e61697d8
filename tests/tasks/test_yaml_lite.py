"""tasks.yaml_lite: the YAML subset core.yaml is written in."""

import pytest
from tritonchat.tasks.yaml_lite import parse_yaml


def test_yaml_subset():
    text = """\
top: 1.25T   # plain text
n: 10
f: -0.5
flag: true
none:
nested:
  inner: it's # not quoted
list_same_indent:
- 'it''s'
- "tab\\there \\u00e9 \\"q\\" \\\\"
tasks:
  - label: a # comment
    num_fewshot: [0, 5]
    delim: "\\nAnswer: "
  -
    label: b
    stop:
      - "#"
      - [x, 'y, z']
"""
    assert parse_yaml(text) == {
        "top": "1.25T", "n": 10, "f": -0.5, "flag": True, "none": None, "nested": {"inner": "it's"},
        "list_same_indent": ["it's", 'tab\there é "q" \\'],
        "tasks": [{"label": "a", "num_fewshot": [0, 5], "delim": "\nAnswer: "},
                  {"label": "b", "stop": ["#", ["x", "y, z"]]}],
    }
    with pytest.raises(ValueError, match=r"c.yaml:2: unexpected indentation"):
        parse_yaml("a: 1\n   b: 2\n", "c.yaml")
    with pytest.raises(ValueError, match=r"c.yaml:1: unterminated \"-quoted string"):
        parse_yaml('a: "x\n', "c.yaml")
