"""The benchmark tasks and their protocols: prompts, decoding and metrics, in one place.

Every default here is the KOSMOS-1 paper's protocol (Huang et al., 2023, sections 4.1-4.5), and every
field can be changed per run (`python -m kosmos.eval run --prompt ... --num-beams ...`, or a task dict in
`train.eval_tasks`):

    task                  kind            prompt                                 decoding           metric
    coco_captioning       captioning      <image>An image of                     beam 5, 20 tokens  CIDEr ...
    flickr30k_captioning  captioning      <image>An image of                     beam 5, 20 tokens  CIDEr ...
    captioning            captioning      (any images; references optional)      beam 5, 20 tokens  CIDEr ...
    vqav2, okvqa, vizwiz  vqa             <image>Question: {question} Answer:    greedy, 10 tokens  VQA acc.
    vqa                   vqa             (any questions; answers optional)      greedy, 10 tokens  VQA acc.
    imagenet              classification  <image>The photo of the                ranked classes     top-1/5
    choice                choice          {text}{candidate} Is it correct?       P("Yes")           accuracy
    labels                labels          <image>The objects in this image are:  greedy, 30 tokens  P/R/F1
    cub                   ranked_choice   Description of {name}: ... <image>Question: what is the name of
                                          {category} in the picture? Answer: + " " name   likelihood     acc
    relativesize          ranked_choice   Is {item1} larger than {item2}? + " Yes" / " No"
                                                                                 log-likelihood     acc
    memorycolor, colorterms
                          ranked_choice   The color of {object} is? + " " colour log-likelihood     acc
    websrc                extractive_qa   <image>Given the context below ... Q: {question} A:
                                                                                 greedy, 20 tokens  EM, F1
    storycloze, hellaswag, winograd, winogrande, piqa, boolq, cb, copa
                          ranked_choice   lm-evaluation-harness's texts          log-likelihood     acc(_norm)
    rendered_sst2         ranked_choice   <image>Question: what is the sentiment of the opinion? Answer:
                                          + " negative" / " positive"            log-likelihood     acc
    hatefulmemes          ranked_choice   <image>Question: does this picture contain real hate speech? Answer:
                                          + " no" / " yes"                       log-likelihood     ROC AUC

Generation stops at `</s>` (always) and at the task's stop strings (a newline for VQA, so a model that
goes on with the next "Question:" is cut there). `{image}` marks where an image goes in a prompt.

Few-shot (`--shots 2,4,8`): k demonstrations, each the prompt filled with a support item and its answer
(`demo`), joined by `separator` before the query. They are drawn at random with a seed from the support
set (as the paper), the same for an item whatever the batch or the number of processes; `--retrieval`
picks the k support images most similar to the query instead (cosine of mean-pooled CLIP features of the
model's own vision tower, as OpenFlamingo's RICES).

The language tasks are scored as lm-evaluation-harness scores them (`kosmos.eval.kinds.ranked`: acc, and
acc_norm, the log-likelihood per character; Winograd and Winogrande by partial scoring); the paper takes
their few-shot demonstrations at random from the training set (`--support`) with k = 0, 1, 4. The
OCR-free prompts are the paper's (section 4.3.1), the candidates after "Answer:" with one space.

VQA acc. follows one of several conventions (`vqa_rules`, see kosmos.eval.vqa_metrics): `lmms-eval` by
default (predictions normalised as for an EvalAI submission, then the official 2021 rule), `vizwiz` for
VizWiz (its own evaluation), `vqa2017` / `vqa2021` the official evaluation's two versions. Every score names
its rule.

The published numbers (`PAPER`) are what `python -m kosmos.eval run` prints beside its own, with the
convention they are known to use (`PAPER_CONVENTIONS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kosmos.config import EVAL_TASK_NAMES, EVAL_TASK_SETTINGS
from kosmos.eval.vqa_metrics import DEFAULT_RULES, VQA_RULES


@dataclass
class TaskSpec:
    """One benchmark's protocol. `{image}` marks an image in a template."""

    kind: str
    """captioning | vqa | classification | choice | labels | ranked_choice | extractive_qa
    (`kosmos.eval.kinds`): which reader, prompts, decoding or ranking, and metric."""
    prompt: str
    """The query. captioning/classification/labels: `{image}` only; vqa: `{question}` too; choice:
    `{text}` (the item's context, `<image>` placeholders for its images) and `{candidate}`; ranked_choice:
    `{context}` (the reader's context of a candidate) and any `{image}`."""
    demo: str = ""
    """One demonstration for few-shot: the prompt with the answer (`{answer}`; ranked_choice: the right
    candidate's `{context}` and continuation `{answer}`). Empty: no few-shot."""
    separator: str = "\n"
    """Between demonstrations, and between the last one and the query."""
    num_beams: int = 1
    """Beam search with this many beams (1: greedy)."""
    max_new_tokens: int = 20
    """Tokens generated at most (fewer where the model's context ends)."""
    length_penalty: float = 1.0
    """Beam search: a finished beam's score is its log-probability / length ** length_penalty."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a generation (besides `</s>`); the text is cut before them."""
    mode: str = "constrained"
    """classification only: `constrained` ranks every class name by its length-normalised log-likelihood
    after the prompt; `unconstrained` generates (beam 2 in the paper) and takes an exact match."""
    answer: str = "Yes"
    """choice only: the word whose probability after each candidate picks the answer."""
    top_k: int = 5
    """labels only: the generated labels kept (split at commas and "and"); classification: top-k accuracy."""
    batch_size: int = 8
    """Queries per batch (per process)."""
    metrics: list[str] = field(default_factory=list)
    """captioning: which of BLEU, METEOR, ROUGE-L, CIDEr, SPICE (empty: all but SPICE, which needs
    Stanford models that pycocoevalcap downloads; METEOR's Java start takes ~13 s); ranked_choice: `roc_auc`
    (two candidates, labels 0/1: HatefulMemes) or `f1` (macro over the classes: CB) besides acc."""
    vqa_rules: str = DEFAULT_RULES
    """vqa only: which VQA acc. convention scores the answers: vqa2017 | vqa2021 | lmms-eval | vizwiz
    (kosmos.eval.vqa_metrics says what each is and why lmms-eval is the default; VizWiz's task: vizwiz)."""
    format: str = ""
    """ranked_choice only: the benchmark file's format (`kosmos.eval.datasets.RANKED_FORMATS`: storycloze,
    hellaswag, wsc273, winogrande, piqa, boolq, cb, copa, hatefulmemes, described, class_folder,
    jsonl)."""
    description: str = ""

    def __post_init__(self):
        if self.vqa_rules not in VQA_RULES:
            raise ValueError(f"unknown vqa_rules {self.vqa_rules!r}; vqa_rules: {' | '.join(VQA_RULES)}")

    def replace(self, **changes) -> TaskSpec:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown task setting(s) {', '.join(unknown)}; settings: "
                             + ", ".join(f.name for f in dataclasses.fields(self)))
        return dataclasses.replace(self, **changes)


_CAPTION = TaskSpec("captioning", prompt="{image}An image of", demo="{image}An image of {answer}",
                    num_beams=5, max_new_tokens=20,
                    description="image captioning (references optional: without them, predictions only)")
_VQA = TaskSpec("vqa", prompt="{image}Question: {question} Answer:",
                demo="{image}Question: {question} Answer: {answer}", num_beams=1, max_new_tokens=10,
                stop=["\n"], description="visual question answering, short answers")

_RANKED = TaskSpec("ranked_choice", prompt="{context}", demo="{context}{answer}", separator="\n\n",
                   batch_size=4)

TASKS: dict[str, TaskSpec] = {
    "coco_captioning": _CAPTION.replace(description="COCO Karpathy test split (5000 images)"),
    "flickr30k_captioning": _CAPTION.replace(description="Flickr30k Karpathy test split (1000 images)"),
    "captioning": _CAPTION,
    "vqav2": _VQA.replace(description="VQAv2 (official question/annotation JSON; test-dev through EvalAI)"),
    "okvqa": _VQA.replace(description="OK-VQA (VQA-format question/annotation JSON)"),
    "vizwiz": _VQA.replace(description="VizWiz (its official single-file JSON), scored by VizWiz's rules",
                           vqa_rules="vizwiz"),
    "vqa": _VQA,
    "imagenet": TaskSpec("classification", prompt="{image}The photo of the", num_beams=2, max_new_tokens=10,
                         description="zero-shot classification: folder per class, or CSV + class names"),
    "classification": TaskSpec("classification", prompt="{image}The photo of the", num_beams=2,
                               max_new_tokens=10, description="zero-shot classification (any classes)"),
    "choice": TaskSpec("choice", prompt="{text}{candidate} Is it correct?", max_new_tokens=1,
                       description="yes/no and multiple choice (Raven IQ protocol): JSONL"),
    "labels": TaskSpec("labels", prompt="{image}The objects in this image are:", max_new_tokens=30,
                       description="open-vocabulary labels (NxTP): JSONL with reference labels"),
    **{name: _RANKED.replace(format=fmt, description=f"{what} (lm-evaluation-harness's format and scoring)")
       for name, fmt, what in (
           ("storycloze", "storycloze", "StoryCloze 2016: CSV as released, or JSONL"),
           ("hellaswag", "hellaswag", "HellaSwag: JSONL"),
           ("winograd", "wsc273", "Winograd WSC273: JSONL, partial scoring"),
           ("winogrande", "winogrande", "Winogrande: JSONL, partial scoring"),
           ("piqa", "piqa", "PIQA: JSONL (+ --annotations its labels file)"),
           ("boolq", "boolq", "BoolQ: SuperGLUE JSONL"),
           ("cb", "cb", "CommitmentBank: SuperGLUE JSONL, acc and macro F1"),
           ("copa", "copa", "COPA: SuperGLUE JSONL"))},
    "rendered_sst2": _RANKED.replace(
        format="class_folder", prompt="{image}Question: what is the sentiment of the opinion? Answer:",
        demo="{image}Question: what is the sentiment of the opinion? Answer:{answer}",
        description="Rendered SST-2: a folder per class (negative/, positive/), the paper's prompt"),
    "hatefulmemes": _RANKED.replace(
        format="hatefulmemes", prompt="{image}Question: does this picture contain real hate speech? Answer:",
        demo="{image}Question: does this picture contain real hate speech? Answer:{answer}",
        metrics=["roc_auc"],
        description="Hateful Memes: its JSONL (dev_seen.jsonl), the paper's prompt; ROC AUC"),
    "cub": _RANKED.replace(
        format="described",
        prompt="{context}\n{image}Question: what is the name of {category} in the picture? Answer:",
        description="classification with descriptions in context (CUB-style JSONL), the paper's "
                               "question; the names ranked"),
    "relativesize": _RANKED.replace(format="jsonl", prompt="Is {item1} larger than {item2}?",
                                    demo="Is {item1} larger than {item2}?{answer}",
                                    description="RelativeSize probe: JSONL {item1, item2, choices [Yes, No], "
                                                "label}, the paper's prompt"),
    "memorycolor": _RANKED.replace(format="jsonl", prompt="The color of {object} is?",
                                   demo="The color of {object} is?{answer}",
                                   description="MemoryColor probe: JSONL {object, choices (the 11 colours), "
                                               "label}, the paper's prompt"),
    "colorterms": _RANKED.replace(format="jsonl", prompt="The color of {object} is?",
                                  demo="The color of {object} is?{answer}",
                                  description="ColorTerms probe: JSONL {object, choices (the 11 colours), "
                                              "label}, the paper's prompt"),
    "websrc": TaskSpec(
        "extractive_qa", prompt="{image}Given the context below from web page, extract the answer from the "
        "given text like this: Qusestion: Who is the publisher of this book? Answer: Penguin Books Ltd. "
        "Context: {context} Q: {question} A:", max_new_tokens=20, stop=["\n"], batch_size=2,
        description="WebSRC: its data folder (--split dev) or a dataset.csv; EM/F1"),
}

TASKS["cb"] = TASKS["cb"].replace(metrics=["f1"])  # lm-evaluation-harness reports CB's macro F1 too

_SETTINGS = tuple(f.name for f in dataclasses.fields(TaskSpec))
if tuple(TASKS) != EVAL_TASK_NAMES or _SETTINGS != EVAL_TASK_SETTINGS:
    # kosmos.config checks train.eval_tasks by these names without importing the evaluation
    raise RuntimeError("kosmos.config.EVAL_TASK_NAMES / EVAL_TASK_SETTINGS must list the tasks of TASKS and "
                       "the fields of TaskSpec, in order: add a new task or setting there too")

PAPER: dict[tuple[str, int], dict[str, float]] = {
    # KOSMOS-1 (1.6B) as the paper reports it (Tables 2 and 3): Karpathy test splits; VQAv2 test-dev.
    ("coco_captioning", 0): {"CIDEr": 84.7},
    ("flickr30k_captioning", 0): {"CIDEr": 67.1},
    ("vqav2", 0): {"accuracy": 51.0},
    ("vizwiz", 0): {"accuracy": 29.2},
    ("vqav2", 4): {"accuracy": 51.8},
    # Section 4.3.2's text: Rendered SST-2 test accuracy, HatefulMemes validation ROC AUC. The language
    # tasks (Table 13), WebSRC (Table 8) and the probes (Table 16) are tables only, not checked here.
    ("rendered_sst2", 0): {"acc": 67.1},
    ("hatefulmemes", 0): {"roc_auc": 63.9},
}

PAPER_CONVENTIONS: dict[str, str] = {
    # How each benchmark's published number was scored, as far as it is known: the paper reports VQAv2 on
    # test-dev, whose answers only EvalAI's server has (so: EvalAI, whatever our `vqa_rules`); VizWiz likewise
    # on its test-dev server (accuracy only: the paper reports no answerability figures). The VizWiz split
    # is taken from memory of the paper and was not checked against its text here.
    "vqav2": "EvalAI, test-dev",
    "vizwiz": "VizWiz server (EvalAI), test-dev (unverified)",
    "rendered_sst2": "test set, accuracy",
    "hatefulmemes": "validation set, ROC AUC",
}


def get_task(name: str, **changes) -> TaskSpec:
    """The task's protocol with `changes` applied; a one-line ValueError names an unknown task or setting,
    or a decoding setting out of range (checked by `kosmos.generate.GenerationConfig`, as for the CLI)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if not changes:
        return TASKS[name]
    spec = TASKS[name].replace(**changes)
    from kosmos.generate import GenerationConfig

    GenerationConfig(num_beams=spec.num_beams, max_new_tokens=spec.max_new_tokens,
                     length_penalty=spec.length_penalty)
    return spec
