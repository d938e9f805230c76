"""The 46 Core-Extended task definitions (22 of them form CORE), as the official Parcae evaluator hard-codes them.

Kept in code rather than read from the bundle because the downloadable ``eval_bundle.zip`` only carries ``core.yaml``
(the 22 CORE tasks); Parcae hard-codes the Core-Extended list the same way. Tests check this table against the
bundle's ``core.yaml`` / ``core_extended.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "
TASK_PREFIX = "core_"


@dataclass(frozen=True)
class TaskSpec:
    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    delimiter: str
    in_core: bool

    @property
    def task_name(self) -> str:
        """lm-eval task name (prefixed so it never collides with lm-eval's stock ``arc_easy`` etc.)."""
        return TASK_PREFIX + self.label


_ROWS = [
    ("mmlu_zeroshot", "world_knowledge/mmlu.jsonl", MC, 0, "Answer: ", False),
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", MC, 0, " ", True),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl", LM, 10, ANSWER, True),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", LM, 10, " ", True),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", MC, 10, ANSWER, True),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl", MC, 10, ANSWER, True),
    ("mmlu_fewshot", "world_knowledge/mmlu.jsonl", MC, 5, ANSWER, False),
    ("bigbench_misconceptions", "world_knowledge/bigbench_misconceptions.jsonl", MC, 10, " ", False),
    ("copa", "commonsense_reasoning/copa.jsonl", MC, 0, " ", True),
    ("siqa", "commonsense_reasoning/siqa.jsonl", MC, 10, " ", False),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", MC, 10, " ", True),
    ("piqa", "commonsense_reasoning/piqa.jsonl", MC, 10, ANSWER, True),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", MC, 0, " ", True),
    ("bigbench_novel_concepts", "commonsense_reasoning/bigbench_novel_concepts.jsonl", MC, 10, " ", False),
    ("bigbench_strange_stories", "commonsense_reasoning/bigbench_strange_stories.jsonl", MC, 10, " ", False),
    ("bigbench_strategy_qa", "commonsense_reasoning/bigbench_strategy_qa.jsonl", MC, 10, " ", False),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", LM, 0, " ", True),
    ("hellaswag", "language_understanding/hellaswag.jsonl", MC, 10, " ", True),
    ("winograd", "language_understanding/winograd_wsc.jsonl", SCHEMA, 0, " ", True),
    ("winogrande", "language_understanding/winogrande.jsonl", SCHEMA, 0, " ", True),
    ("bigbench_conlang_translation", "language_understanding/bigbench_conlang_translation.jsonl", LM, 0, " ", False),
    ("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", MC, 10,
     " ", True),
    ("bigbench_conceptual_combinations", "language_understanding/bigbench_conceptual_combinations.jsonl", MC, 10,
     " ", False),
    ("bigbench_elementary_math_qa", "symbolic_problem_solving/bigbench_elementary_math_qa.jsonl", MC, 10, " ", False),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", LM, 10, " ", True),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", MC, 3, " ", True),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", LM, 10, " ", True),
    ("bigbench_logical_deduction", "symbolic_problem_solving/bigbench_logical_deduction.jsonl", MC, 10, " ", False),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", LM, 10, " ", True),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", LM, 10, " ", True),
    ("simple_arithmetic_nospaces", "symbolic_problem_solving/simple_arithmetic_nospaces.jsonl", LM, 10, " ", False),
    ("simple_arithmetic_withspaces", "symbolic_problem_solving/simple_arithmetic_withspaces.jsonl", LM, 10, " ",
     False),
    ("math_qa", "symbolic_problem_solving/math_qa.jsonl", MC, 10, " ", False),
    ("logi_qa", "symbolic_problem_solving/logi_qa.jsonl", MC, 10, ANSWER, False),
    ("pubmed_qa_labeled", "reading_comprehension/pubmed_qa_labeled.jsonl", LM, 10, " ", False),
    ("squad", "reading_comprehension/squad.jsonl", LM, 10, " ", True),
    ("agi_eval_lsat_rc", "reading_comprehension/agi_eval_lsat_rc.jsonl", MC, 3, " ", False),
    ("agi_eval_lsat_lr", "reading_comprehension/agi_eval_lsat_lr.jsonl", MC, 3, " ", False),
    ("coqa", "reading_comprehension/coqa.jsonl", LM, 0, " ", True),
    ("bigbench_understanding_fables", "reading_comprehension/bigbench_understanding_fables.jsonl", MC, 10, " ", False),
    ("boolq", "reading_comprehension/boolq.jsonl", MC, 10, ANSWER, True),
    ("agi_eval_sat_en", "reading_comprehension/agi_eval_sat_en.jsonl", MC, 3, " ", False),
    ("winogender_mc_female", "safety/winogender_mc_female.jsonl", MC, 10, " ", False),
    ("winogender_mc_male", "safety/winogender_mc_male.jsonl", MC, 10, " ", False),
    ("enterprise_pii_classification", "safety/enterprise_pii_classification.jsonl", MC, 10, " ", False),
    ("bbq", "safety/bbq.jsonl", MC, 3, " ", False),
]

TASKS: dict[str, TaskSpec] = {row[0]: TaskSpec(*row) for row in _ROWS}
CORE_LABELS: tuple[str, ...] = tuple(label for label, spec in TASKS.items() if spec.in_core)
CORE_EXTENDED_LABELS: tuple[str, ...] = tuple(TASKS)
GROUPS: dict[str, tuple[str, ...]] = {"core": CORE_LABELS, "core_extended": CORE_EXTENDED_LABELS}

# DCLM's corrected ("v2") random baselines in percent, used when the bundle does not ship eval_meta_data_v2.csv
# (the downloadable bundle only carries the v1 csv). Only the rows that differ from v1 are listed.
V2_BASELINE_OVERRIDES: dict[str, float] = {
    "siqa": 50.0, "commonsense_qa": 40.3, "bigbench_novel_concepts": 25.0,
    "bigbench_language_identification": 25.0, "bigbench_conceptual_combinations": 33.0,
    "bigbench_elementary_math_qa": 25.0, "agi_eval_lsat_ar": 25.0, "bigbench_logical_deduction": 25.0,
    "logi_qa": 25.0, "agi_eval_lsat_rc": 25.0, "agi_eval_lsat_lr": 25.0, "bigbench_understanding_fables": 25.0,
}


def resolve_task_names(names: list[str]) -> list[str]:
    """Expand group names (``core``, ``core_extended``) and task names (with or without the ``core_`` prefix) into
    task labels in Parcae order; unknown names raise ``ValueError`` listing what is available."""
    wanted: set[str] = set()
    unknown = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in TASKS:
            wanted.add(name)
        elif name.startswith(TASK_PREFIX) and name[len(TASK_PREFIX):] in TASKS:
            wanted.add(name[len(TASK_PREFIX):])
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"unknown task(s): {', '.join(unknown)}. Available: groups {', '.join(GROUPS)}, bpb; "
            f"tasks {', '.join(TASKS)}"
        )
    return [label for label in CORE_EXTENDED_LABELS if label in wanted]
