"""Submit main_linprobe.py (linear probing) to Slurm with submitit; see FINETUNE.md.

Takes every flag of main_linprobe.py plus the Slurm flags of util/submit.py, e.g.
    python submitit_linprobe.py --nodes 2 --ngpus 8 --partition gpu --job_dir /checkpoint/$USER/%j ...
The job requeues itself on preemption or time-out and resumes from the newest checkpoint in --output_dir.
"""

import main_linprobe
from util import submit

if __name__ == "__main__":
    args = submit.parse_args(main_linprobe.get_args_parser(), "Submit main_linprobe.py to Slurm")
    submit.submit("main_linprobe", args)
