from django import forms


class AddWorkerForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        required=False,
        help_text="A name for the machine, e.g. <code>basement-3090</code>. Letters, digits, dots and dashes "
        "read best in commands; you can leave it empty and pass any name to <code>agora-worker enroll</code>.",
        widget=forms.TextInput(attrs={"placeholder": "basement-3090"}),
    )

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        if name and not all(c.isalnum() or c in "-_." for c in name):
            raise forms.ValidationError("Use letters, digits, dots, dashes and underscores only.")
        return name


class SuspendForm(forms.Form):
    reason = forms.CharField(max_length=1000, widget=forms.Textarea(attrs={"rows": 2}),
                             help_text="Shown to the owner and recorded in the public ledger.")
