from django.dispatch import Signal

# Sent with ``proposal_id=`` once the transaction that approved a training proposal has committed.
training_proposal_approved = Signal()
