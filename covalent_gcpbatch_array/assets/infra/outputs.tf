# Named like the executor's configuration keys: each output is the value of that key.

output "project_id" {
  value = var.project_id
}

output "region" {
  value = var.region
}

output "bucket_name" {
  value = google_storage_bucket.tasks.name
}

output "bucket_prefix" {
  value = var.bucket_prefix
}

output "container_image_uri" {
  description = "Where runner_image/ pushes the task image (make -C runner_image cloud-build)."
  value       = local.container_image_uri
}

output "service_account_email" {
  value = local.task_service_account
}
