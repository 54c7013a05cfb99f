"""Reports regap writes from a run's files: `regap report` (a `regap demo` run: `demo`; a `regap study`
folder is rendered by the study's own report, `regap.study.study_report`) and the HTML rendering and
overwrite rule every report shares (`html`)."""
