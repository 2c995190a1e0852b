# Google Cloud resources for the gcpbatch_array executor: `covalent deploy up gcpbatch_array`.
#
# Creates the APIs, the bucket for task objects, the Artifact Registry repository for the task
# image, and the service account the Batch tasks run as, with only the roles a task needs; then
# writes gcpbatch_array.conf, which Covalent copies into [executors.gcpbatch_array].
#
# `terraform validate` needs the Google provider, which cannot be downloaded offline: this
# configuration is checked with `terraform fmt -check` and a parse (tests/test_infra.py).

terraform {
  required_version = ">= 1.3"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.0, < 7.0"
    }
    local = {
      source  = "hashicorp/local"
      version = ">= 2.4"
    }
  }
}

locals {
  # Covalent runs Terraform with PATH as its only environment variable, so the provider cannot
  # find Application Default Credentials through HOME or GOOGLE_APPLICATION_CREDENTIALS.
  adc_file         = pathexpand("~/.config/gcloud/application_default_credentials.json")
  credentials_file = var.credentials_file != "" ? var.credentials_file : (fileexists(local.adc_file) ? local.adc_file : "")

  bucket_name         = var.bucket_name != "" ? var.bucket_name : "${var.project_id}-covalent-gcpbatch-array"
  built_image_uri     = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}/${var.image_name}:${var.image_tag}"
  container_image_uri = var.container_image_uri != "" ? var.container_image_uri : local.built_image_uri

  # The tasks' identity: the account made here, or an existing one given as a variable.
  task_service_account = var.service_account_email != "" ? var.service_account_email : google_service_account.tasks[0].email
  task_member          = "serviceAccount:${local.task_service_account}"

  apis = toset([
    "artifactregistry.googleapis.com", # the task image
    "batch.googleapis.com",            # the jobs
    "cloudbuild.googleapis.com",       # building the task image (runner_image/cloudbuild.yaml)
    "compute.googleapis.com",          # the VMs Batch creates
    "iam.googleapis.com",              # the task service account
    "logging.googleapis.com",          # task output in Cloud Logging
    "storage.googleapis.com",          # task inputs and results
  ])

  # What a task needs, on the project. See docs/deploy.md for each role and why.
  task_project_roles = toset([
    "roles/batch.agentReporter", # the Batch agent on the VM reports task states
    "roles/logging.logWriter",   # task stdout/stderr reach Cloud Logging
  ])

  # What a task needs, on the bucket: it creates objects and never replaces one.
  task_bucket_roles = toset([
    "roles/storage.objectCreator", # results, errors, each attempt's stdout.N / stderr.N
    "roles/storage.objectViewer",  # inputs, the lease, cancel markers, the task's folder
  ])

  # What the Covalent server's identity needs, when dispatcher_member is set.
  dispatcher_project_roles = toset([
    "roles/batch.jobsEditor", # create, read and delete the executor's jobs
    "roles/logging.viewer",   # `gcpbatch-array logs` reads task logs
  ])
}

provider "google" {
  project     = var.project_id
  region      = var.region
  credentials = local.credentials_file != "" ? file(local.credentials_file) : null
}

resource "google_project_service" "apis" {
  for_each = local.apis

  service = each.value
  # Other workloads in the project may use these APIs: never turn them off on destroy.
  disable_on_destroy = false
}

resource "google_storage_bucket" "tasks" {
  name                        = local.bucket_name
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.force_destroy

  # Task objects the executor could not delete (a stopped server, keep_objects) expire.
  lifecycle_rule {
    condition {
      age            = var.object_retention_days
      matches_prefix = ["${var.bucket_prefix}/"]
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = var.repository_id
  format        = "DOCKER"
  description   = "Task images of the covalent-gcpbatch-array executor"

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "tasks" {
  count = var.service_account_email == "" ? 1 : 0

  account_id   = var.service_account_id
  display_name = "covalent-gcpbatch-array tasks"
  description  = "Identity of the Batch tasks that run Covalent electrons"

  depends_on = [google_project_service.apis]
}

resource "google_project_iam_member" "task" {
  for_each = local.task_project_roles

  project = var.project_id
  role    = each.value
  member  = local.task_member
}

# Read inputs, leases and markers, list a task's folder, and create results and each
# attempt's output (never replacing an object): no task can delete or overwrite another's.
resource "google_storage_bucket_iam_member" "task_objects" {
  for_each = local.task_bucket_roles

  bucket = google_storage_bucket.tasks.name
  role   = each.value
  member = local.task_member
}

resource "google_artifact_registry_repository_iam_member" "task_image_pull" {
  project    = var.project_id
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = local.task_member
}

resource "google_project_iam_member" "dispatcher" {
  for_each = var.dispatcher_member == "" ? toset([]) : local.dispatcher_project_roles

  project = var.project_id
  role    = each.value
  member  = var.dispatcher_member
}

resource "google_storage_bucket_iam_member" "dispatcher_objects" {
  count = var.dispatcher_member == "" ? 0 : 1

  bucket = google_storage_bucket.tasks.name
  role   = "roles/storage.objectUser"
  member = var.dispatcher_member
}

# Batch only accepts a job whose service account the creator may act as.
resource "google_service_account_iam_member" "dispatcher_acts_as_tasks" {
  count = var.dispatcher_member == "" ? 0 : 1

  service_account_id = "projects/${var.project_id}/serviceAccounts/${local.task_service_account}"
  role               = "roles/iam.serviceAccountUser"
  member             = var.dispatcher_member
}

resource "local_file" "executor_config" {
  filename        = "${path.module}/gcpbatch_array.conf"
  file_permission = "0644"
  content = templatefile("${path.module}/gcpbatch_array.conf.tftpl", {
    project_id            = var.project_id
    region                = var.region
    bucket_name           = google_storage_bucket.tasks.name
    bucket_prefix         = var.bucket_prefix
    container_image_uri   = local.container_image_uri
    service_account_email = local.task_service_account
  })
}
