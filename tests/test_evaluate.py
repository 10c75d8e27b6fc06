import copy
import json
import math

import pytest
import sacrebleu
import torch

from slimtune.data.example import make_example
from slimtune.data.tokenize import IGNORE_INDEX, Collator, encode_example
from slimtune.evaluate import (
    EvalReport,
    OptionScores,
    bleu,
    chrf,
    evaluate,
    exact_match,
    extract_number,
    first_line,
    generate,
    infer_task,
    option_accuracy,
    score_options,
    target_loss,
)
from slimtune.features.losses import example_losses, length_batches, response_logits, score_losses, score_rows


def chat(prompt, response, **metadata):
    return make_example([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                        **metadata)


@pytest.mark.parametrize(("text", "number"), [
    ("She pays $1,000.", "1000"),
    ("so 12 * 3 = 36 apples in all.", "36"),
    ("The answer is 5.0", "5"),
    ("It is 2.50 dollars", "2.5"),
    ("The temperature fell to -4", "-4"),
    ("between 3-4 hours", "4"),
    ("costs -$3.50.", "-3.5"),
    ("Step 1: 48/2 = 24\n#### 72\nCheck: 3 steps", "72"),
    ("1,2,3", "3"),
    ("100", "100"),
    ("no digits here", None),
])
def test_extract_number_reads_the_answer_a_model_writes(text, number):
    assert extract_number(text) == number


def test_exact_match_compares_numbers_not_strings():
    assert exact_match("so he has $1,000.00 left.", "1000")
    assert exact_match("#### 5.0", "5")
    assert exact_match("The answer is 18.", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18")
    assert not exact_match("The answer is 17.", "18")
    assert not exact_match("I do not know.", "18")


def test_translation_metrics_are_sacrebleu_corpus_scores_on_the_first_line():
    refs = ["The cat sits on the mat.", "I like green tea."]
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert bleu(refs, refs) == pytest.approx(100.0)
    hyps = ["A cat is on the mat.", "I love tea."]
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < chrf(hyps, refs) < 100
    assert first_line("\n  I like tea.  \nIn French, this means ...") == "I like tea."


def test_option_choice_by_mean_or_sum_log_prob():
    # A long option with a better per-token log-prob but a worse total than a short one.
    scores = OptionScores(options=["no", "yes it is"], logprob_sum=[-3.0, -4.0], tokens=[1, 4])
    assert scores.best("mean") == "yes it is"
    assert scores.best("sum") == "no"
    assert option_accuracy([scores, scores], ["yes it is", " no "], "mean") == 0.5


def examples_of_varied_length():
    return [chat("What is 2 + 2?", "4", task="a"),
            chat("Name a colour of the sky on a clear day, and explain why it looks that way.",
                 "Blue, because air scatters short wavelengths more than long ones.", task="b"),
            chat("Hi", "Hello! How can I help?", task="a")]


def test_loss_with_logits_to_keep_equals_the_full_logit_loss(tiny):
    model, tokenizer = tiny
    rows = [encode_example(ex, tokenizer) for ex in examples_of_varied_length()]
    batch = Collator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        kept, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert kept.shape[1] == labels.shape[1] < full.shape[1]  # the prompts' logits were skipped
    full_loss, full_count = example_losses(full, batch["labels"])
    loss, count = score_losses(model, [batch])
    assert torch.equal(count, full_count)
    assert torch.allclose(loss, full_loss, atol=1e-5)


def test_target_loss_is_token_weighted_and_perplexity_its_exp(tiny):
    model, tokenizer = tiny
    examples = examples_of_varied_length()
    result = target_loss(model, tokenizer, examples, batch_size=2)
    total, tokens = 0.0, 0
    for ex in examples:  # one at a time, full logits: the loss of all response tokens as one text
        row = Collator(tokenizer.pad_token_id)([encode_example(ex, tokenizer)])
        with torch.no_grad():
            logits = model(input_ids=row["input_ids"]).logits
        loss, count = example_losses(logits, row["labels"])
        total, tokens = total + float(loss * count), tokens + int(count)
    assert result.tokens == [sum(t != IGNORE_INDEX for t in encode_example(ex, tokenizer)["labels"])
                             for ex in examples]
    assert result.loss == pytest.approx(total / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert result.loss != pytest.approx(sum(result.losses) / len(examples), rel=1e-4)  # not a mean of means
    assert set(result.by_task(examples)) == {"a", "b"}


def test_a_token_budget_keeps_long_rows_from_padding_their_neighbours_and_changes_no_score(tiny):
    lengths = [1500, 40, 30, 900, 20, 10]
    groups = length_batches(lengths, 2000, max_rows=8)
    assert groups == [[0], [3, 1], [2, 4, 5]]  # 1500 alone, 900 + 40 within 2,000, the short rest together
    assert sorted(i for g in groups for i in g) == list(range(6))

    model, tokenizer = tiny
    rows = [encode_example(ex, tokenizer) for ex in examples_of_varied_length()]
    one_by_one = score_rows(model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=1)
    budgeted = score_rows(model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=8,
                          max_batch_tokens=2 * max(len(r["input_ids"]) for r in rows))
    assert torch.equal(budgeted[1], one_by_one[1])
    assert torch.allclose(budgeted[0], one_by_one[0], atol=1e-5)


def test_rows_over_max_length_keep_their_response(tiny):
    model, tokenizer = tiny
    long = chat("word " * 300, "Short answer.")
    result = target_loss(model, tokenizer, [long], max_length=64)
    assert result.truncated == 1 and result.tokens[0] > 0


@pytest.fixture(scope="module")
def talkative(tiny):
    """The tiny model with larger random weights: its greedy text varies instead of repeating one token."""
    model = copy.deepcopy(tiny[0])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def test_left_padded_batched_generation_equals_one_at_a_time(talkative, tokenizer):
    prompts = ["Hi", "What is two plus two? Answer with a number.", "Translate to English: le chat est noir",
               "a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    examples = [chat(p, "-") for p in prompts]
    batched = generate(talkative, tokenizer, examples, max_new_tokens=10, batch_size=3, progress=False)
    alone = [generate(talkative, tokenizer, [ex], max_new_tokens=10, batch_size=1, progress=False)[0]
             for ex in examples]
    assert batched == alone
    assert len(set(batched)) == len(batched) and all(batched)


def test_generation_stops_at_the_models_end_token(talkative, tokenizer):
    from slimtune.data.tokenize import render_prompt

    model = copy.deepcopy(talkative)
    example = chat("Tell me a story.", "-")
    prompt = tokenizer(render_prompt(tokenizer, example.prompt_messages), add_special_tokens=False,
                       return_tensors="pt")["input_ids"]
    new = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                         do_sample=False)[0, prompt.shape[1]:].tolist()
    assert len(new) == 6
    model.generation_config.eos_token_id = new[3]
    assert generate(model, tokenizer, [example], max_new_tokens=6, progress=False) == [
        tokenizer.decode(new[:3], skip_special_tokens=True).strip()]


class Favouring(torch.nn.Module):
    """A model that adds a large logit to some tokens, so which option it prefers is known."""

    def __init__(self, model, token_ids):
        super().__init__()
        self.model, self.token_ids = model, token_ids

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **cache)
        out.logits[..., self.token_ids] += 30.0
        return out


def test_option_accuracy_picks_the_option_the_model_prefers(tiny):
    model, tokenizer = tiny
    favoured = Favouring(model, tokenizer("Paris", add_special_tokens=False)["input_ids"])
    question = "What is the capital of France?"
    right = chat(question, "Paris", options=["London", "Paris", "Rome"])
    wrong = chat(question, "Rome", options=["London", "Paris", "Rome"])
    scored = score_options(favoured, tokenizer, [right, wrong], batch_size=2)
    assert [s.best("mean") for s in scored] == ["Paris", "Paris"]
    assert [s.best("sum") for s in scored] == ["Paris", "Paris"]
    report = evaluate(favoured, tokenizer, {"p3": [right, wrong, chat("Say hi.", "hi")]}, progress=False)
    assert report.tasks["p3"] == "choice"
    assert report.metrics["p3"]["accuracy"] == 0.5 and report.metrics["p3"]["accuracy_sum"] == 0.5
    assert report.counts["p3"]["with_options"] == 2
    assert [r.get("correct") for r in report.predictions["p3"]] == [True, False, None]


@pytest.mark.parametrize("max_length, max_batch_tokens", [(None, 4096), (40, 50)])
def test_options_scored_on_a_shared_prompt_cache_equal_each_option_scored_whole(tiny, max_length,
                                                                                 max_batch_tokens):
    model, tokenizer = tiny
    options = ["Paris", "the city of Lyon, in the south", "Rome", "no idea at all"]
    example = chat("Which city is the capital of France? Think about it. " * 3, "Paris", options=options)
    [scored] = score_options(model, tokenizer, [example], batch_size=3, max_length=max_length,
                             max_batch_tokens=max_batch_tokens)
    whole = [encode_example(chat(example.prompt_text, option), tokenizer) for option in options]
    if max_length is not None:  # as the shared cache does: every option sees the same prompt, cut from the left
        cut = max(len(r["input_ids"]) for r in whole) - max_length
        whole = [{k: v[cut:] for k, v in r.items()} for r in whole]
    losses, counts = score_rows(model, whole, pad_token_id=tokenizer.pad_token_id)
    assert scored.tokens == counts.tolist()
    assert scored.logprob_sum == pytest.approx((-losses * counts).tolist(), rel=1e-4, abs=1e-4)


def test_evaluate_picks_each_sets_task_and_round_trips_as_json(tiny, tmp_path):
    model, tokenizer = tiny
    sets = {"gsm8k": [chat("2 + 2?", "2 + 2 = 4\n#### 4", answer="4", task="gsm8k")] * 2,
            "tatoeba": [chat("Translate from French to English: Bonjour.", "Hello.", reference="Hello.",
                             task="fra-eng")],
            "taskmaster4": [make_example([{"role": "user", "content": "A latte, please."},
                                          {"role": "assistant", "content": "What size?"},
                                          {"role": "user", "content": "Large."},
                                          {"role": "assistant", "content": "Done."}], task="dialogue")]}
    assert [infer_task(examples) for examples in sets.values()] == ["gsm8k", "translation", "loss"]
    report = evaluate(model, tokenizer, sets, max_new_tokens=4, progress=False)
    assert report.tasks == {"gsm8k": "gsm8k", "tatoeba": "translation", "taskmaster4": "loss"}
    assert set(report.metrics["gsm8k"]) == {"exact_match", "loss", "perplexity"}
    assert set(report.metrics["tatoeba"]) == {"chrf", "bleu", "loss", "perplexity"}
    assert set(report.metrics["taskmaster4"]) == {"loss", "perplexity"}
    assert report.counts["gsm8k"]["examples"] == 2 and report.counts["gsm8k"]["generated"] == 2
    assert report.predictions["gsm8k"][0]["reference"] == "4"
    assert report.breakdown["tatoeba"]["fra-eng"]["tokens"] == report.counts["tatoeba"]["response_tokens"]

    path = tmp_path / "eval.json"
    report.to_json(path)
    assert EvalReport.from_json(path) == report
    assert json.loads(path.read_text())["metrics"]["gsm8k"] == report.metrics["gsm8k"]
    text = str(report)
    assert "tatoeba" in text and "translation" in text and f"{report.metrics['gsm8k']['loss']:.4f}" in text


def test_loss_only_evaluation_skips_generation(tiny, monkeypatch):
    import slimtune.evaluate.tasks as tasks

    monkeypatch.setattr(tasks, "generate", lambda *a, **k: pytest.fail("generated when only loss was asked"))
    model, tokenizer = tiny
    report = evaluate(model, tokenizer, {"gsm8k": [chat("1 + 1?", "#### 2", answer="2")]}, metrics=("loss",),
                      keep_predictions=False)
    assert set(report.metrics["gsm8k"]) == {"loss", "perplexity"} and report.predictions == {}
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(model, tokenizer, {"gsm8k": []}, metrics=("exact-match",))


def test_a_peft_wrapped_model_scores_and_generates(tokenizer):
    from slimtune.models import LoraSettings, apply_lora, load_model

    model, _ = load_model("tiny", device="cpu")
    model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh adapter is a no-op; make it change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rows = [encode_example(ex, tokenizer) for ex in examples_of_varied_length()]
    batch = Collator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        full_loss, _ = example_losses(model(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits, batch["labels"])
    loss, _ = score_losses(model, [batch])
    assert torch.allclose(loss, full_loss, atol=1e-5)
    texts = generate(model, tokenizer, examples_of_varied_length(), max_new_tokens=3, progress=False)
    assert len(texts) == 3


@pytest.mark.slow
def test_embedded_model_on_gsm8k_questions(shared_data):
    from slimtune.models import load_model

    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")][:8]
    examples = [chat(r["question"], r["answer"], id=f"gsm8k-test-{i}", answer=r["answer"].split("#### ")[-1],
                     task="gsm8k") for i, r in enumerate(rows)]
    model, tokenizer = load_model("smollm2", device="cpu")
    report = evaluate(model, tokenizer, {"gsm8k": examples}, max_new_tokens=128, batch_size=8, progress=False)
    metrics = report.metrics["gsm8k"]
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert 0.5 < metrics["loss"] < 3.0 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert all(r["prediction"] for r in report.predictions["gsm8k"])
