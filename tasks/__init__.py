"""Tasks: datasets of conversations or documents with their evaluation rules.

`common` (the Task base, TaskMixture, TaskSequence, categorical scoring), `datafiles` (the `<base>/tasks_data/`
layout), one module per dataset (smoltalk, mmlu, arc, gsm8k, humaneval, spellingbee, customjson), `core` (the
CORE metric) and `execution` (the code sandbox).
"""
