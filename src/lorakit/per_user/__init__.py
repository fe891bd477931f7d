"""Per-user adapters, RecLoRA-style: a CRM lens, a long-short history retriever, a personalized LoRA bank."""
from .bank import PersonalizedLoRA
from .crm import CRM, train_crm
from .few2many import auc, examples, export_users, fit_model, predict, sample_events
from .movielens import Event, Movie, RecData, fetch, read
from .retriever import prompt, short_history

__all__ = ["CRM", "Event", "Movie", "PersonalizedLoRA", "RecData", "auc", "examples", "export_users", "fetch",
           "fit_model", "predict", "prompt", "read", "sample_events", "short_history", "train_crm"]
