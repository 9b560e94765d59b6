"""The generation engine (sampling, per-request seeds), packing and the teacher/student alignment on
the tiny model."""

import pytest
import torch

from opsd.core.data import Problem
from opsd.core.errors import UserError
from opsd.core.models import Backbone, output_head
from opsd.core.packing import pack, response_hidden
from opsd.core.prompts import render_prompt
from opsd.core.tiny import build_tiny
from opsd.generation import SamplingConfig, make_engine, request_seed
from opsd.generation.hf import sample, sample_token
from opsd.generation.rollouts import collect_rollouts
from opsd.objectives.gating import gate
from opsd.teacher.contexts import check_template, fill, teacher_user_message


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=1)
    return model.eval(), tokenizer


def test_greedy_batched_sampling_matches_generate(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, "What is 2+2?"), render_prompt(tok, "Compute 37 + 45 - 12, carefully.")]
    results = sample(model, prompts, SamplingConfig(temperature=0, max_new_tokens=12), [tok.eos_token_id],
                     tok.pad_token_id,
                     [0, 0])
    for prompt, (response, logprobs, truncated) in zip(prompts, [(g.response_ids, g.logprobs,
                                                                  g.truncated) for g in results]):
        reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
        assert response == reference[0, len(prompt):].tolist()[: len(response)]
        assert truncated == (tok.eos_token_id not in response)
        assert logprobs.shape == (len(response),)


def test_sampled_logprobs_are_those_of_the_sampling_distribution(tiny):
    model, tok = tiny
    prompt = render_prompt(tok, "Hi")
    config = SamplingConfig(temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=6)
    (generation,) = sample(model, [prompt], config, [tok.eos_token_id], tok.pad_token_id, [7])
    response, logprobs = generation.response_ids, generation.logprobs
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    for position, token in enumerate(response):
        row = logits[position] / 0.7
        row = row.masked_fill(row < row.topk(10).values[-1], -torch.inf)
        probs, order = row.softmax(-1).sort(descending=True)
        keep = order[(probs.cumsum(0) - probs) < 0.9]
        filtered = torch.full_like(row, -torch.inf)
        filtered[keep] = row[keep]
        assert token in keep.tolist()
        torch.testing.assert_close(logprobs[position], torch.log_softmax(filtered, -1)[token], atol=1e-5, rtol=1e-5)


def test_top_k_one_is_greedy():
    logits = torch.randn(5, 50)
    token, logprob = sample_token(logits, SamplingConfig(temperature=1.0, top_k=1), torch.rand(5, dtype=torch.float64))
    assert torch.equal(token, logits.argmax(-1)) and torch.allclose(logprob, torch.zeros(5))


def test_inverse_cdf_draws_follow_the_filtered_distribution():
    """Frequencies of 40,000 draws match the temperature/top-k/top-p distribution; filtered and
    zero-probability entries are never drawn, even at uniforms next to 0 and 1."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    logits[0, 3] = -torch.inf  # zero probability
    config = SamplingConfig(temperature=0.8, top_k=8, top_p=0.95)
    uniforms = torch.cat([torch.rand(40_000, dtype=torch.float64), torch.tensor([0.0, 1e-17, 1 - 1e-16])])
    token, logprob = sample_token(logits.expand(len(uniforms), -1), config, uniforms)
    _, expected = sample_token(logits, config, torch.tensor([0.5], dtype=torch.float64))
    row = logits[0] / 0.8
    row = row.masked_fill(row < row.topk(8).values[-1], -torch.inf)
    probs, order = row.softmax(-1).sort(descending=True)
    keep = order[(probs.cumsum(0) - probs) < 0.95]
    target = torch.zeros(12)
    target[keep] = row[keep].softmax(-1)
    counts = torch.bincount(token[:40_000], minlength=12).float() / 40_000
    assert set(token.tolist()) <= set(keep.tolist()) and 3 not in token.tolist()
    assert (counts - target).abs().max() < 0.01  # ~4 standard errors at p = 0.5
    torch.testing.assert_close(logprob, torch.log(target)[token], atol=1e-5, rtol=1e-5)


def test_a_request_samples_the_same_alone_or_in_any_batch(tiny):
    """Per-request seeds: the sample of a request depends on its seed only, not on the batch size nor
    on the requests decoded with it; another seed gives another sample."""
    model, tok = tiny
    prompts = [render_prompt(tok, f"Compute {i} + {i}.") for i in range(6)]
    config = SamplingConfig(temperature=1.0, max_new_tokens=16)
    engine = make_engine(model, tok, config)
    seeds = [request_seed(0, 1, i) for i in range(6)]
    together = engine.generate(prompts, config, seeds)
    in_pairs = engine.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=16, batch_size=2), seeds)
    alone = [engine.generate([p], config, [s])[0] for p, s in zip(prompts, seeds)]
    reordered = engine.generate(prompts[::-1], config, seeds[::-1])[::-1]
    for a, b, c, d in zip(together, in_pairs, alone, reordered):
        assert a.response_ids == b.response_ids == c.response_ids == d.response_ids
    other = engine.generate(prompts, config, [request_seed(1, 1, i) for i in range(6)])
    assert [g.response_ids for g in other] != [g.response_ids for g in together]


def test_rollouts_are_n_per_prompt_in_prompt_order(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, "a"), render_prompt(tok, "bb")]
    config = SamplingConfig(temperature=1.0, max_new_tokens=8, n=3)
    rollouts = collect_rollouts(make_engine(model, tok, config), prompts, config, [11, 12])
    assert [r.problem_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
    assert [r.prompt_ids for r in rollouts] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert len({r.seed for r in rollouts}) == 6


def test_teacher_sees_exactly_the_student_response_after_its_own_prompt(tiny):
    model, tok = tiny
    problems = [Problem("a", "Compute 3 + 4.", "7", "3 + 4 = 7."), Problem("b", "Compute 10 - 2.", "8", "10 - 2 = 8.")]
    responses = [tok("3+4=7. Answer: 7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 tok("8", add_special_tokens=False)["input_ids"]]
    student_prompts = [render_prompt(tok, p.problem) for p in problems]
    teacher_prompts = [render_prompt(tok, teacher_user_message(p, "reference", "", "")) for p in problems]
    student = pack(student_prompts, responses, tok.pad_token_id, torch.device("cpu"))
    teacher = pack(teacher_prompts, responses, tok.pad_token_id, torch.device("cpu"))
    assert torch.equal(student.targets_N, teacher.targets_N)
    assert student.targets_N.tolist() == responses[0] + responses[1]
    flat = pack(student_prompts, responses, tok.pad_token_id, torch.device("cpu"), flat=True)
    assert torch.equal(flat.targets_N, student.targets_N)
    assert torch.equal(flat.input_ids_B_L.flatten()[flat.predict_index_N + 1], flat.targets_N)
    assert flat.position_ids_B_L.tolist()[0] == [*range(len(student_prompts[0]) + len(responses[0])),
                                                 *range(len(student_prompts[1]) + len(responses[1]))]
    for packed, prompts in ((student, student_prompts), (teacher, teacher_prompts)):
        flat = packed.input_ids_B_L.flatten()
        assert torch.equal(flat[packed.predict_index_N + 1], packed.targets_N)  # hidden at i predicts token i+1
        for row, prompt in enumerate(prompts):
            length = int(packed.attention_mask_B_L[row].sum())
            assert packed.input_ids_B_L[row, :length].tolist() == prompt + responses[row]
    assert "reference solution" in tok.decode(teacher_prompts[0]) and "3 + 4 = 7." in tok.decode(teacher_prompts[0])
    assert "reference" not in tok.decode(student_prompts[0])


def test_padding_changes_nothing(tiny):
    """A response's hidden states are the same alone as right-padded in a batch with a longer one."""
    model, tok = tiny
    prompts = [render_prompt(tok, "short"), render_prompt(tok, "a much longer prompt than the other one")]
    responses = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    together = pack(prompts, responses, tok.pad_token_id, torch.device("cpu"))
    backbone = Backbone(model)
    with torch.no_grad():
        batched = response_hidden(backbone, together)
        flat = response_hidden(backbone, pack(prompts, responses, tok.pad_token_id, torch.device("cpu"), flat=True))
        alone = []
        for prompt, response in zip(prompts, responses):
            single = pack([prompt], [response], tok.pad_token_id, torch.device("cpu"))
            alone.append(response_hidden(backbone, single))
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat, torch.cat(alone), atol=1e-5, rtol=1e-5)  # padding-free = one at a time
    logits = model(together.input_ids_B_L, attention_mask=together.attention_mask_B_L).logits
    flat_logits = logits.reshape(-1, logits.shape[-1])[together.predict_index_N]
    torch.testing.assert_close(batched @ output_head(model).T, flat_logits, atol=1e-4, rtol=1e-4)


def test_gating_selects_the_right_rollouts():
    correct = [True, False, True, False]
    truncated = [False, False, False, True]
    assert gate(correct, truncated, "all") == [True] * 4
    assert gate(correct, truncated, "correct_only") == [True, False, True, False]
    assert gate(correct, truncated, "incorrect_only") == [False, True, False, True]
    assert gate(correct, truncated, "correct_and_truncated") == [True, False, True, True]


def test_teacher_contexts():
    p = Problem("x", "Compute 2 + 2.", "4", "2 + 2 = 4.")
    assert "4" in teacher_user_message(p, "answer", "", "") and "2 + 2 = 4." not in teacher_user_message(p, "answer",
                                                                                                         "", "")
    assert teacher_user_message(p, "concise", "", "Be brief.") == "Be brief.\n\nCompute 2 + 2."
    assert teacher_user_message(p, "template", "Q: {problem} A: {answer}", "") == "Q: Compute 2 + 2. A: 4"
    with pytest.raises(UserError, match="reference solution"):
        teacher_user_message(Problem("y", "Compute.", "1"), "reference", "", "")


@pytest.mark.parametrize("bad", ["{problem.__class__}", "{answer[0]}", "{0}", "{}", "{secret}", "{problem!r}",
                                 "{problem:>10}", "{"])
def test_templates_refuse_anything_but_plain_named_fields(bad):
    with pytest.raises(UserError, match="teacher.template"):
        check_template(bad, "teacher.template")


def test_fill_does_not_interpret_field_values():
    p = Problem("x", "What is {answer}?", "{problem.__class__}", None)
    assert fill("{problem} -> {answer}", p) == "What is {answer}? -> {problem.__class__}"


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny):
    """A frequent token as 'EOS' makes greedy rows end at different steps: the batch compacts as they
    do, and every row still matches decoding it alone with transformers' generate."""
    model, tok = build_tiny(seed=4)
    torch.manual_seed(4)
    with torch.no_grad():  # large random weights: varied greedy continuations
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.eval()
    prompts = [render_prompt(tok, f"Compute {i} + {i * 7 % 10}{'!' * i}") for i in range(8)]
    unpack = lambda gs: [(g.response_ids, g.logprobs, g.truncated) for g in gs]
    probe = unpack(sample(model, prompts, SamplingConfig(temperature=0, max_new_tokens=12), [-1], tok.pad_token_id,
                          [0] * 8))
    first = lambda t, ids: ids.index(t) if t in ids else len(ids)
    stop = max({t for ids, _, _ in probe for t in ids}, key=lambda t: len({first(t, ids) for ids, _, _ in probe}))
    results = unpack(sample(model, prompts, SamplingConfig(temperature=0, max_new_tokens=12), [stop], tok.pad_token_id,
                            [0] * 8))
    lengths = {len(ids) for ids, _, _ in results}
    assert len(lengths) > 2  # rows really did finish at different steps
    for prompt, (ids, logprobs, truncated) in zip(prompts, results):
        alone = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, eos_token_id=stop, pad_token_id=tok.pad_token_id)
        assert ids == alone[0, len(prompt):].tolist()[: len(ids)]
        assert truncated == (stop not in ids) and len(logprobs) == len(ids)
