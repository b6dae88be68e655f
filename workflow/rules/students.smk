# Stage 2: every method (vanilla included) for every pair and seed, then an independent evaluation.


rule distill:
    input:
        data=lambda w: f"{OUT}/data/{w.dataset}.ready",
        teacher=teacher_checkpoint,
        aggregation=aggregation_input,
    output:
        best=f"{OUT}/students/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}/best.pt",
        last=f"{OUT}/students/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}/last.pt",
        result=f"{OUT}/students/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}/result.json",
    log:
        f"{OUT}/logs/distill/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/distill/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: resources_for("distill")["threads"]
    resources:
        gpu=resources_for("distill")["gpu"],
        mem_mb=resources_for("distill")["mem_mb"],
        runtime=resources_for("distill")["runtime"],
    params:
        job=lambda w: as_json(
            student_job(w.dataset, w.teacher, w.student, w.method, w.seed)
        ),
        run_dir=lambda w, output: os.path.dirname(output.result),
        aggregation=lambda w, input: (
            f"--aggregation {input.aggregation}" if input.aggregation else ""
        ),
        gpu=gpu_env("distill"),
        parent=PARENT_RUN_ARG,
    shell:
        "{params.gpu}dfakd distill --config-json {params.job:q} {params.parent} --teacher {input.teacher} "
        "{params.aggregation} -o {params.run_dir} > {log} 2>&1"


rule evaluate_student:
    input:
        data=lambda w: f"{OUT}/data/{w.dataset}.ready",
        checkpoint=f"{OUT}/students/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}/last.pt",
    output:
        f"{OUT}/students/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}/eval.json",
    log:
        f"{OUT}/logs/evaluate_student/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_student/{{dataset}}/{{teacher}}/{{student}}/{{method}}/s{{seed}}.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: resources_for("evaluate")["threads"]
    resources:
        gpu=resources_for("evaluate")["gpu"],
        mem_mb=resources_for("evaluate")["mem_mb"],
        runtime=resources_for("evaluate")["runtime"],
    params:
        job=lambda w: as_json(job_config("evaluate", w.dataset, w.student)),
        gpu=gpu_env("evaluate"),
    shell:
        "{params.gpu}dfakd evaluate --config-json {params.job:q} --checkpoint {input.checkpoint} -o {output} "
        "> {log} 2>&1"
