"""Question sets asked in many languages: readers, language tags, the warehouse import, graders.

Nothing here runs a model: the LLM judge, a grader that does, lives in :mod:`xici.recorder.judge`.
"""
