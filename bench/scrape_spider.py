"""The Scrapy baseline: the same crawl and extraction as straw's static scrape, as a small spider.

Run as its own process (Twisted's reactor runs once per process):
`python -m bench.scrape_spider BASE_URL [real]` prints `{"pages": …, "items": …, "seconds": …}`
of the second of two crawls in that process, timed from its first request to the spider
closing: interpreter start-up, imports and first-use costs are left out, as they are on
straw's side, which also times a crawl after a warm-up crawl in the same process.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import scrapy
from scrapy.crawler import CrawlerProcess
from scrapy.http import Response, TextResponse

from fixtures.webui.server import PASSWORD, USER


def _amount(text: str) -> Decimal:
    body = text.replace("€", "").replace(".", "").replace(",", ".").strip()
    return Decimal(body)


class OrdersSpider(scrapy.Spider):
    name = "orders"

    def __init__(self, base: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base
        self.pages = 0
        self.items = 0
        self.started = 0.0
        self.seconds = 0.0

    async def start(self) -> AsyncIterator[scrapy.Request]:  # Scrapy >= 2.13
        for request in self.start_requests():
            yield request

    def start_requests(self) -> Iterator[scrapy.Request]:
        self.started = time.perf_counter()
        yield scrapy.Request(self.base + "login", callback=self.login)

    def login(self, response: Response) -> Iterator[scrapy.Request]:
        assert isinstance(response, TextResponse)
        yield scrapy.FormRequest.from_response(
            response, formcss="form#loginForm", formdata={"UserName": USER, "Password": PASSWORD},
            callback=self.logged_in,
        )

    def logged_in(self, response: Response) -> Iterator[scrapy.Request]:
        yield scrapy.Request(self.base + "orders", callback=self.parse_list)

    def parse_list(self, response: Response) -> Iterator[Any]:
        self.pages += 1
        headers = [" ".join(h.split()) for h in response.css("table#orders tr th::text").getall()]
        column = {name: i for i, name in enumerate(headers)}
        for row in response.css("table#orders tr.row"):
            cells = [" ".join(" ".join(td.css("::text").getall()).split()) for td in row.xpath("./td")]
            amount = row.css("td.amt::text").get()
            self.items += 1
            yield {
                "order_no": int(cells[column["Ordernr."]]),
                "customer": cells[column["Klant"]],
                "order_date": dt.datetime.strptime(cells[column["Datum"]], "%d-%m-%Y").date(),
                "amount": _amount(amount or ""),
                "paid": " ".join(row.xpath("./td[5]//text()").getall()).strip().lower() in ("ja", "yes"),
            }
        following = response.css("a.next::attr(href)").get()
        if following:
            yield response.follow(following, callback=self.parse_list)

    def closed(self, reason: str) -> None:
        self.seconds = time.perf_counter() - self.started


class RealSpider(OrdersSpider):
    """The realistic-weight pages (`/real/list`, 25 rows a page, and each row's detail page), no login."""

    name = "real"

    def start_requests(self) -> Iterator[scrapy.Request]:
        self.started = time.perf_counter()
        yield scrapy.Request(self.base + "real/list", callback=self.parse_list)

    def parse_list(self, response: Response) -> Iterator[Any]:
        self.pages += 1
        headers = [" ".join(h.split()) for h in response.css("table.grid thead th::text").getall()]
        column = {name: i for i, name in enumerate(headers)}
        for row in response.css("table.grid tbody tr.item"):
            cells = [" ".join(" ".join(td.css("::text").getall()).split()) for td in row.xpath("./td")]
            item = {
                "order_no": int(cells[column["No"]]),
                "customer": cells[column["Customer"]],
                "order_date": dt.datetime.strptime(cells[column["Date"]], "%d-%m-%Y").date(),
                "amount": Decimal(row.css("td.amt::text").get() or ""),
            }
            yield response.follow(row.css("td a::attr(href)").get() or "", callback=self.parse_detail,
                                  cb_kwargs={"item": item})
        following = response.css("a.next::attr(href)").get()
        if following:
            yield response.follow(following, callback=self.parse_list)

    def parse_detail(self, response: Response, item: dict[str, Any]) -> Iterator[Any]:
        self.pages += 1
        self.items += 1
        status = " ".join(" ".join(response.css("#status ::text").getall()).split())
        note = " ".join(" ".join(response.css("#note ::text").getall()).split())
        yield {**item, "status": status, "note": note}


def main() -> None:
    process = CrawlerProcess(settings={
        "LOG_LEVEL": "ERROR",
        "ROBOTSTXT_OBEY": False,
        "TELNETCONSOLE_ENABLED": False,
        "ITEM_PIPELINES": {},
        "REQUEST_FINGERPRINTER_IMPLEMENTATION": "2.7",
    })
    spider_class = RealSpider if sys.argv[2:] == ["real"] else OrdersSpider
    warm_up, crawler = process.create_crawler(spider_class), process.create_crawler(spider_class)
    # One after the other: the timed crawl starts when the warm-up has closed.
    process.crawl(warm_up, base=sys.argv[1]).addCallback(lambda _: process.crawl(crawler, base=sys.argv[1]))
    process.start()
    spider = crawler.spider
    assert isinstance(spider, OrdersSpider)
    print(json.dumps({"pages": spider.pages, "items": spider.items, "seconds": spider.seconds}), flush=True)


if __name__ == "__main__":
    main()
