# Stage 1 (one search per pair and search seed, shared by every distillation seed that uses it) and
# the derivation of discrete aggregations (searched modes from a search; fixed modes need none).


rule search:
    input:
        data=lambda w: f"{OUT}/data/{w.dataset}.ready",
        teacher=teacher_checkpoint,
    output:
        search=f"{OUT}/search/{{dataset}}/{{teacher}}/{{student}}/{{variant}}s{{sseed}}/search.json",
        trajectory=f"{OUT}/search/{{dataset}}/{{teacher}}/{{student}}/{{variant}}s{{sseed}}/alpha_trajectory.csv",
        heatmap=report(
            f"{OUT}/search/{{dataset}}/{{teacher}}/{{student}}/{{variant}}s{{sseed}}/alphas.png",
            caption="../report/search.rst",
            category="Aggregation search",
            subcategory="{dataset}: {teacher} -> {student}",
            labels={"figure": "alphas", "variant": "{variant}", "seed": "{sseed}"},
        ),
        trajectory_plot=report(
            f"{OUT}/search/{{dataset}}/{{teacher}}/{{student}}/{{variant}}s{{sseed}}/alpha_trajectory.png",
            caption="../report/search.rst",
            category="Aggregation search",
            subcategory="{dataset}: {teacher} -> {student}",
            labels={"figure": "trajectory", "variant": "{variant}", "seed": "{sseed}"},
        ),
    log:
        f"{OUT}/logs/search/{{dataset}}/{{teacher}}/{{student}}/{{variant}}s{{sseed}}.log",
    benchmark:
        f"{OUT}/benchmarks/search/{{dataset}}/{{teacher}}/{{student}}/{{variant}}s{{sseed}}.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: resources_for("search")["threads"]
    resources:
        gpu=resources_for("search")["gpu"],
        gpu_pool=LOCAL_GPUS,
        gpu_slots=LOCAL_GPU_SLOTS,
        mem_mb=resources_for("search")["mem_mb"],
        runtime=resources_for("search")["runtime"],
    params:
        job=decides(job_of_search),
        run=run_only(job_of_search),
        run_dir=lambda w, output: os.path.dirname(output.search),
        parent=PARENT_RUN_FILE,
    shell:
        "DFAKD_GPU_POOL={resources.gpu_pool} DFAKD_GPU_SLOTS={resources.gpu_slots} DFAKD_JOB_GPUS={resources.gpu} dfakd search --config-json {params.job:q} --config-json {params.run:q} --parent-run-file {params.parent:q} --set teacher.checkpoint={input.teacher:q} "
        "-o {params.run_dir:q} > {log:q} 2>&1"


# deriving an aggregation reads one JSON and writes one YAML: not worth a cluster job
localrules:
    derive,


rule derive:
    input:
        search=derive_search_input,
    output:
        f"{OUT}/aggregations/{{dataset}}/{{teacher}}/{{student}}/{{variant}}{{mode}}-s{{sseed}}.yaml",
    log:
        f"{OUT}/logs/derive/{{dataset}}/{{teacher}}/{{student}}/{{variant}}{{mode}}-s{{sseed}}.log",
    benchmark:
        f"{OUT}/benchmarks/derive/{{dataset}}/{{teacher}}/{{student}}/{{variant}}{{mode}}-s{{sseed}}.tsv"
    conda:
        "../envs/dfakd.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        job=decides(job_of_derive),
        run=run_only(job_of_derive),
        search=lambda w, input: option("--search", input.search),
    shell:
        "dfakd derive --config-json {params.job:q} --config-json {params.run:q} --mode {wildcards.mode} {params.search:q} -o {output:q} > {log:q} 2>&1"
