"""RULER-style long-context recall (arXiv 2404.06654, written here from the task definitions):
NIAH single / multi-key / multi-value / multi-query, variable tracking, common-word extraction and
a multi-turn NIAH among tool outputs; 8K to 1M tokens of varied seeded filler, each prompt a chat
turn through the model's template; agentmem's position policies beside full attention on the
same prompts.

    python -m benchmarks.ruler --model qwen2.5-coder-0.5b-instruct --tasks niah_multikey,vt \
        --lengths 8K,32K,128K,1M --prompts 20 --depths 0.1,0.5,0.9 --preset 4k \
        --position infllm,stacked,contiguous --full-max 32768 \
        --out benchmarks/results/ruler_x.json --plots benchmarks/results/ruler_x --resume \
        --time-budget 540

Files: `filler.py` (the text generators), `prompts.py` (pieces, chat template, token length),
`tasks.py` (layouts and scorers), `runner.py` (the CLI, rows, diagnostics), `report.py` (table,
heatmaps). Rows go to --out (one per prompt and policy, rewritten atomically after each), the
summary table beside it (.txt), heatmaps to --plots. Under a time limit pass --time-budget
(seconds, counted from the start, model loading included) and --resume: each call goes on where
the last stopped; a SIGTERM also keeps every finished row.
"""
