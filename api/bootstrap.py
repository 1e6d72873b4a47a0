"""Start-up chores: make sure the bootstrap admin key exists (REFINERY_BOOTSTRAP_TOKEN)."""
from sqlalchemy.exc import IntegrityError

from core.settings import Settings
from db.repositories.projects import create_key, get_or_create_project, key_exists
from db.session import transaction


def ensure_bootstrap_key(settings: Settings) -> None:
    token = settings.bootstrap_token
    if not token:
        return
    try:
        with transaction(settings.database_url) as session:
            if not key_exists(session, token):
                project = get_or_create_project(session, settings.bootstrap_project)
                create_key(session, project, name="bootstrap", key=token)
    except IntegrityError:
        pass  # another API process (REFINERY_API_PROCESSES > 1, or a replica) created it at the same moment
