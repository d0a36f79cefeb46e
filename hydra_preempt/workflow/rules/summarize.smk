# The summary of every experiment: a table of final metrics (CSV and Markdown) and the loss curves.


rule summarize:
    input:
        results=expand(f"{RUNS}/{{experiment}}/result.json", experiment=list(EXPERIMENTS)),
    output:
        csv=f"{RESULTS}/summary.csv",
        markdown=f"{RESULTS}/summary.md",
        plot=f"{RESULTS}/loss_curves.png",
    params:
        names=list(EXPERIMENTS),
        overrides=[" ".join(e.overrides) for e in EXPERIMENTS.values()],
    localrule: True
    script:
        "../scripts/summarize.py"
