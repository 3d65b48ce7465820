"""The resource monitor on a GPU, with a plain transformers Trainer (needs only torch, transformers, psutil and,
for utilisation, pynvml): GPU fields in every step log, exact sample / non-padding token counts, the per-batch hook
and per-log sample costs, and 120-step runs with and without the monitor, interleaved.

    python benchmarks/monitor_gpu.py          # writes benchmarks/results/monitor_gpu.json ($OUT if set)

Model: BERT, 4 layers, hidden 256, bf16 autocast, batch 32 of random lengths 16-128 (dynamic padding).
"""
import json, os, random, sys, time
sys.path.insert(0, os.getcwd())
import torch
from transformers import BertConfig, BertForTokenClassification, Trainer, TrainerCallback, TrainingArguments
from tunepipe.tracking.monitor import ResourceMonitor, format_summary

OUT = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
rng = random.Random(0)
LENGTHS = [rng.randint(16, 128) for _ in range(640)]

class DS(torch.utils.data.Dataset):
    def __len__(self): return len(LENGTHS)
    def __getitem__(self, i):
        n = LENGTHS[i]; g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(5, 1000, (n,), generator=g), "labels": torch.randint(0, 5, (n,), generator=g)}

def collate(feats):
    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.zeros(len(feats), n, dtype=torch.long); mask = torch.zeros_like(ids); lab = torch.full_like(ids, -100)
    for i, f in enumerate(feats):
        k = len(f["input_ids"]); ids[i, :k] = f["input_ids"]; mask[i, :k] = 1; lab[i, :k] = f["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}

class Rec(TrainerCallback):
    def __init__(self): self.logs = []
    def on_log(self, args, state, control, logs=None, **kw): self.logs.append(dict(logs or {}))

def train(monitor: bool, steps=int(os.environ.get("STEPS", 120))):
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                                                  num_attention_heads=4, intermediate_size=1024, num_labels=5))
    args = TrainingArguments(output_dir=f"{OUT}/ckpt", max_steps=steps, per_device_train_batch_size=32,
                             logging_steps=10, report_to="none", save_strategy="no", bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    rec = Rec(); mon = ResourceMonitor(None) if monitor else None
    cbs = ([mon] if mon else []) + [rec]
    tr = Trainer(model=model, args=args, train_dataset=DS(), data_collator=collate, callbacks=cbs)
    t = time.perf_counter(); tr.train(); torch.cuda.synchronize(); dt = time.perf_counter() - t
    return dt, rec.logs, mon

print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
try:
    import pynvml; print("pynvml importable", pynvml.__file__)
except ImportError as e:
    print("no pynvml", e)
train(False, steps=20)  # warm-up (kernels, allocator)
# micro-timings of what the monitor does
mon0 = ResourceMonitor(None)
class _A: world_size = 1; train_batch_size = 32; per_device_train_batch_size = 32; gradient_accumulation_steps = 1
class _S: global_step = 0; is_world_process_zero = True
m = torch.nn.Linear(4, 4).cuda().train()
mon0.on_train_begin(_A(), _S(), None, model=None)
mask = torch.ones(32, 128, device="cuda", dtype=torch.long)
def per_call(fn, n):
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
micro = {"hook_us": per_call(lambda: mon0._count_batch(m, (), {"input_ids": mask, "attention_mask": mask}), 2000),
         "snapshot_us": per_call(mon0._snapshot, 200)}
try:
    micro["torch_cuda_utilization_us"] = per_call(torch.cuda.utilization, 50)
except Exception as e:
    micro["torch_cuda_utilization_us"] = str(e)
print("micro", json.dumps(micro))
times = {"off": [], "on": []}
for _ in range(5):
    for mode in ("off", "on"):
        dt, logs, mon = train(mode == "on")
        times[mode].append(dt)
step_logs = [l for l in logs if "loss" in l]
print("step log example", json.dumps(step_logs[-1]))
s = mon.summary
print(json.dumps(s, indent=1))
print(format_summary(s))
# 120 steps x 32 = 3840 samples = 6 epochs of 640 (every sample 6 times)
checks = {
  "gpu fields in every step log": all({"gpu_mem_mb", "gpu_mem_peak_mb"} <= set(l) for l in step_logs),
  "gpu_util in step logs": all("gpu_util" in l for l in step_logs),
  "samples exact": s["samples"] == 120 * 32,
  "tokens exact": s["tokens"] == 6 * sum(LENGTHS),
  "gpu peak > 0": (s.get("gpu_mem_peak_mb") or 0) > 0,
}
print("checks", json.dumps(checks))
print("train seconds off/on", times, "min-to-min overhead %.1f%%" % (100 * (min(times["on"]) / min(times["off"]) - 1)))
json.dump({"device": torch.cuda.get_device_name(0), "loadavg": os.getloadavg(), "micro": micro, "checks": checks, "times": times, "summary": s, "last_step_log": step_logs[-1]}, open(f"{OUT}/monitor_gpu.json", "w"), indent=1)
