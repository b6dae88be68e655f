# Summary tables and plots over every student and teacher of the experiment.
localrules:
    summary,
    plots,


rule summary:
    input:
        results=student_results(),
        evaluations=student_evaluations(),
        teachers=list(teacher_evaluations().values()),
    output:
        csv=report(
            f"{OUT}/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "summary (CSV, for scripts)"},
        ),
        md=report(
            f"{OUT}/summary.md",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "summary (Markdown)"},
        ),
        html=report(
            f"{OUT}/summary.html",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "summary (read here)"},
        ),
    log:
        f"{OUT}/logs/summary.log",
    benchmark:
        f"{OUT}/benchmarks/summary.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        teachers=teacher_options(),
        published=published_json(),
        title=f"dfakd experiment {EXP}",
    shell:
        "dfakd summarize {input.results:q} {params.teachers:q} --published-json {params.published:q} "
        "--title {params.title:q} --csv {output.csv:q} --md {output.md:q} --html {output.html:q} > {log:q} 2>&1"


rule plots:
    input:
        results=student_results(),
        teachers=list(teacher_evaluations().values()),
    output:
        accuracy=report(
            f"{OUT}/plots/accuracy.png",
            caption="../report/accuracy.rst",
            category="Plots",
        ),
        curves=report(
            f"{OUT}/plots/learning_curves.png",
            caption="../report/curves.rst",
            category="Plots",
        ),
    log:
        f"{OUT}/logs/plots.log",
    benchmark:
        f"{OUT}/benchmarks/plots.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        teachers=teacher_options(),
    shell:
        "dfakd plot {input.results:q} {params.teachers:q} --accuracy {output.accuracy:q} --curves {output.curves:q} "
        "> {log:q} 2>&1"
