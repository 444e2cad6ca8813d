"""lm-eval's local-completions model against a running ``mixtral serve``: loglikelihood and generate_until.

Needs lm-eval (``pip install "lm_eval[api]"``, best in its own virtualenv: it is not a dependency of this
project) and a server, e.g. over a tiny random checkpoint (its numbers are noise, the protocol is real)::

    mixtral local init-tiny /tmp/tiny && mixtral serve --provider local --model-path /tmp/tiny --port 8123 &
    python examples/lm_eval_harness.py http://127.0.0.1:8123 [batch_size]
"""

import sys

from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

url = sys.argv[1]
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="mixtral-local", tokenizer_backend="auto",
                         max_length=4096, num_concurrent=1, batch_size=batch)
print("tokenizer backend:", lm.tokenizer_backend)  # "remote": the server's /tokenize, nothing downloaded
pairs = [("The river runs", " to the sea"), ("A cat sat on", " the mat"), ("Paris is the capital of", " France")]
scored = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                           for i, p in enumerate(pairs)])
for pair, (logprob, greedy) in zip(pairs, scored, strict=True):
    print(f"{pair!r}: log P = {logprob:.4f}, greedy: {greedy}")
asked = Instance(request_type="generate_until", doc={}, arguments=("The river", {"until": ["\n"], "max_gen_toks": 5}),
                 idx=0)
print("generate_until:", lm.generate_until([asked]))
