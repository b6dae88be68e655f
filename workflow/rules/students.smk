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
        gpu_pool=LOCAL_GPUS,
        gpu_slots=LOCAL_GPU_SLOTS,
        mem_mb=resources_for("distill")["mem_mb"],
        runtime=resources_for("distill")["runtime"],
    params:
        job=decides(job_of_distill),
        run=run_only(job_of_distill),
        run_dir=lambda w, output: os.path.dirname(output.result),
        aggregation=lambda w, input: option("--aggregation", input.aggregation),
        parent=PARENT_RUN_FILE,
    shell:
        "DFAKD_GPU_POOL={resources.gpu_pool} DFAKD_GPU_SLOTS={resources.gpu_slots} DFAKD_JOB_GPUS={resources.gpu} dfakd distill --config-json {params.job:q} --config-json {params.run:q} --parent-run-file {params.parent:q} --teacher {input.teacher:q} "
        "{params.aggregation:q} -o {params.run_dir:q} > {log:q} 2>&1"


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
        gpu_pool=LOCAL_GPUS,
        gpu_slots=LOCAL_GPU_SLOTS,
        mem_mb=resources_for("evaluate")["mem_mb"],
        runtime=resources_for("evaluate")["runtime"],
    params:
        job=decides(job_of_evaluate_student),
        run=run_only(job_of_evaluate_student),
    shell:
        "DFAKD_GPU_POOL={resources.gpu_pool} DFAKD_GPU_SLOTS={resources.gpu_slots} DFAKD_JOB_GPUS={resources.gpu} dfakd evaluate --config-json {params.job:q} --config-json {params.run:q} --checkpoint {input.checkpoint:q} -o {output:q} "
        "> {log:q} 2>&1"
