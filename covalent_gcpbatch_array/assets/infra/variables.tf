# Terraform variables of `covalent deploy up gcpbatch_array`.
#
# Covalent writes them into terraform.tfvars from ExecutorInfraDefaults
# (covalent_gcpbatch_array/deploy.py) and from the `--name=value` options; keep the names and
# defaults of both in step (tests/test_infra.py checks they are).

variable "project_id" {
  type        = string
  default     = ""
  description = "Google Cloud project to deploy into (required)."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "Set project_id to your Google Cloud project id: covalent deploy up gcpbatch_array --project_id=my-project."
  }
}

variable "region" {
  type        = string
  default     = "us-east1"
  description = "Region of the bucket, the image repository and the Batch jobs."
}

variable "bucket_name" {
  type        = string
  default     = ""
  description = "Bucket for task inputs and results; empty means <project_id>-covalent-gcpbatch-array."
}

variable "bucket_prefix" {
  type        = string
  default     = "covalent-gcpbatch-array"
  description = "Folder of the executor's job folders in the bucket (the executor key bucket_prefix)."
}

variable "object_retention_days" {
  type        = number
  default     = 7
  description = "Objects under bucket_prefix are deleted this many days after they were written."

  validation {
    condition     = var.object_retention_days >= 1 && floor(var.object_retention_days) == var.object_retention_days
    error_message = "object_retention_days must be a whole number of days, at least 1."
  }
}

variable "force_destroy" {
  type        = bool
  default     = true
  description = "Let `covalent deploy down` delete the bucket with the task objects still in it."
}

variable "repository_id" {
  type        = string
  default     = "covalent-gcpbatch-array"
  description = "Artifact Registry Docker repository that holds the task image."
}

variable "container_image_uri" {
  type        = string
  default     = ""
  description = "An existing task image to use; empty means the image this repository holds (image_name:image_tag)."
}

variable "image_name" {
  type        = string
  default     = "covalent-gcpbatch-array"
  description = "Name of the task image in the repository."
}

variable "image_tag" {
  type        = string
  default     = "0.1.0"
  description = "Tag of the task image: the covalent-gcpbatch-array version it holds (which pins covalent)."
}

variable "service_account_id" {
  type        = string
  default     = "covalent-gcpbatch-array"
  description = "Account id of the service account the Batch tasks run as (6 to 30 characters)."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.service_account_id))
    error_message = "service_account_id must be 6 to 30 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "service_account_email" {
  type        = string
  default     = ""
  description = "An existing service account for the tasks (it is granted the task roles); empty means create one."
}

variable "dispatcher_member" {
  type        = string
  default     = ""
  description = "Optional IAM member running the Covalent server (user:me@example.com, serviceAccount:...): granted what the executor and `gcpbatch-array` need."

  validation {
    condition     = var.dispatcher_member == "" || can(regex("^(user|serviceAccount|group):[^@\\s]+@[^@\\s]+$", var.dispatcher_member))
    error_message = "dispatcher_member must be empty or an IAM member such as user:me@example.com or serviceAccount:name@project.iam.gserviceaccount.com."
  }
}

variable "credentials_file" {
  type        = string
  default     = ""
  description = "Google credentials JSON for Terraform; empty means the gcloud application-default credentials file, else the VM's metadata server."
}
